"""Schedule-free AdamW's two sets of weights, kept apart for evaluation and checkpoints.

Schedule-free optimizers (Defazio et al. 2024, the `schedulefree` package) compute gradients at an
interpolation y between the fast iterate z and their running average x, and it is x that should be
scored, sampled and saved. `optimizer.eval()` swaps the parameters to x, `optimizer.train()` back to
y. `EvalWeights` calls them: evaluation and the end of training see x, training steps see y, and a
checkpoint always holds x with the optimizer state marked "eval", so that loading it and calling
train() rebuilds y. Optimizers without eval()/train() are left alone.

A checkpoint written at a validation holds exactly the weights the run had then, and a resume
from it continues bit for bit as the uninterrupted run (both go from x to y the same way). One
written between validations (Ctrl-C, SIGTERM, every_n_train_steps) also swaps the training run to x
and back, which rounds y in its last bit: a resume matches a run that saved at the same steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch

from lmlab.errors import ConfigError


def adamw_schedule_free(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float = 2.5e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
) -> torch.optim.Optimizer:
    """The `schedulefree` package's AdamWScheduleFree, or a one-line error naming the extra that installs it."""
    try:
        from schedulefree import AdamWScheduleFree
    except ImportError:
        raise ConfigError(
            "optimizer=schedulefree needs the schedulefree package (pip install -e '.[optim]'); or set optimizer=adamw"
        ) from None
    return AdamWScheduleFree(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps
    )


def averaging_optimizer(trainer: pl.Trainer) -> Any | None:
    """The run's optimizer if it keeps averaged weights (has eval() and train()), else None."""
    optimizers = trainer.optimizers
    if not optimizers:
        return None
    optimizer = optimizers[0]
    return (
        optimizer
        if callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
        else None
    )


def in_train_mode(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.param_groups[0].get("train_mode", False))


class EvalWeights(pl.Callback):
    """Averaged weights (optimizer.eval()) for validation, test, the end of training and checkpoints;
    the training iterate (optimizer.train()) before every training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if (optimizer := averaging_optimizer(trainer)) is not None:
            optimizer.train()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._eval(trainer)

    @staticmethod
    def _eval(trainer: pl.Trainer) -> None:
        if (optimizer := averaging_optimizer(trainer)) is not None:
            optimizer.eval()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """A save while training holds y: write x and the eval-mode optimizer state instead."""
        optimizer = averaging_optimizer(trainer)
        if optimizer is None or not in_train_mode(optimizer) or "optimizer_states" not in checkpoint:
            return
        optimizer.eval()
        try:
            weights = checkpoint["state_dict"]
            for name, p in pl_module.named_parameters(remove_duplicate=False):
                if name in weights:
                    weights[name] = p.detach().clone()
            checkpoint["optimizer_states"][0] = optimizer.state_dict()
        finally:
            optimizer.train()
