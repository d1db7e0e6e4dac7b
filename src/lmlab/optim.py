"""Optimizer parameter groups and learning-rate schedules.

Schedules come in three kinds: per optimizer step (warmup + cosine/linear/constant, which need the
run's `total_steps`), per epoch (step decay) and per validation (plateau). `lightning_scheduler`
tells Lightning which is which.

Weight decay shrinks weight matrices towards zero; applied to biases, norm gains or embeddings it
only hurts (GPT-2/nanoGPT practice), so those go in an undecayed group.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from lmlab.errors import ConfigError


def decayed_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters weight decay applies to: weight matrices, not biases, norms, embeddings or
    matrices a model marks `_no_weight_decay` (Mamba's A_log: decay rates).

    Decided on the model as built: FSDP (use_orig_params) later turns each parameter into a 1-D shard
    of itself, the same object with another shape, so its dimensions no longer tell a matrix.
    """
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return {
        id(p)
        for p in model.parameters()
        if p.dim() >= 2 and id(p) not in embeddings and not getattr(p, "_no_weight_decay", False)
    }


def parameter_groups(model: nn.Module, weight_decay: float, decayed: set[int] | None = None) -> list[dict]:
    """Split trainable parameters into decayed matrices (`decayed`, by default found now) and everything else."""
    decayed = decayed_parameters(model) if decayed is None else decayed
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if id(p) in decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _decay_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """How far past warmup towards the last step, from 0 to 1."""
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """Linear warmup, then cosine decay to `min_lr_ratio` x the peak at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = _decay_progress(step, warmup_steps, total_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_linear(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup, then linear decay to `min_lr_ratio` x the peak at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        return 1 - (1 - min_lr_ratio) * _decay_progress(step, warmup_steps, total_steps)

    return LambdaLR(optimizer, factor)


def warmup_constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100) -> LambdaLR:
    """Linear warmup, then the peak learning rate throughout."""
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps))


class EpochStepDecay(LambdaLR):
    """A schedule stepped once per training epoch (Lightning interval "epoch"), so its count is
    epochs completed: exact under step-bounded runs and restored exactly from a checkpoint."""

    interval = "epoch"


def step_decay(optimizer: torch.optim.Optimizer, factor: float = 1 / 1.2, start_epoch: int = 6) -> EpochStepDecay:
    """The peak rate for the first `start_epoch` epochs, then `factor` times less each following epoch.

    start_epoch=6 is the TensorFlow PTB tutorial's max_epoch=6 (lr_decay ** max(i + 1 - max_epoch, 0) for
    0-based epoch i: epoch 7 is the first decayed). Zaremba et al.'s Torch code, with the same max_epoch,
    decays when `epoch > max_epoch` at an epoch's end, one epoch later: start_epoch=7 here.
    """
    if not factor > 0:
        raise ConfigError(
            f"task.scheduler.factor={factor} must be > 0 (it multiplies the LR each epoch): "
            "e.g. task.scheduler.factor=0.8333 divides it by 1.2"
        )
    if factor > 1:
        raise ConfigError(
            f"task.scheduler.factor={factor} would raise the LR every epoch: step_decay multiplies by it, "
            f"so to divide by {factor} set task.scheduler.factor={1 / factor:.6g}"
        )
    if start_epoch < 0:
        raise ConfigError(
            f"task.scheduler.start_epoch={start_epoch} must be >= 0 (epochs trained at the peak LR before decaying)"
        )
    return EpochStepDecay(optimizer, lambda epoch: factor ** max(0, epoch + 1 - start_epoch))


class ValidationPlateau(ReduceLROnPlateau):
    """Divide the LR by 1/factor when `monitor` has not improved for `patience` validations.

    Lightning offers a plateau scheduler the monitored value after every optimizer step (the last
    validation's value stays in its metrics), so a scheduler stepped every N steps would count one
    validation N times. The task calls `validation_ended()` after each pass, and only the next
    `step()` counts. Validation may run per epoch or every N steps (trainer.val_check_interval).
    """

    interval = "step"
    monitor = "val/bpb"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: float = 0.25,
        patience: int = 0,
        threshold: float = 0.0,
        min_lr: float = 0.0,
    ) -> None:
        if not 0 < factor < 1:
            raise ConfigError(
                f"task.scheduler.factor={factor} must be in (0, 1) (the LR is multiplied by it on a plateau): "
                "e.g. task.scheduler.factor=0.25 divides it by 4"
            )
        if patience < 0:
            raise ConfigError(f"task.scheduler.patience={patience} must be >= 0 (validations without improvement)")
        super().__init__(optimizer, mode="min", factor=factor, patience=patience, threshold=threshold, min_lr=min_lr)
        self.fresh = False  # a validation ended and its value has not been taken yet

    def validation_ended(self) -> None:
        self.fresh = True

    def step(self, metrics: float | torch.Tensor, epoch: int | None = None) -> None:  # type: ignore[override]
        if self.fresh:
            self.fresh = False
            super().step(float(metrics))


def plateau(
    optimizer: torch.optim.Optimizer,
    factor: float = 0.25,
    patience: int = 0,
    threshold: float = 0.0,
    min_lr: float = 0.0,
) -> ValidationPlateau:
    """PyTorch's word_language_model annealing by default: the LR divided by 4 after any validation
    whose val/bpb is no better than the best so far."""
    return ValidationPlateau(optimizer, factor=factor, patience=patience, threshold=threshold, min_lr=min_lr)


def schedule_arguments(factory: Callable[..., Any], total_steps: int) -> dict[str, int]:
    """The run-length arguments `factory` takes: step schedules need `total_steps`, epoch and plateau ones do not."""
    accepts = inspect.signature(getattr(factory, "func", factory)).parameters
    return {"total_steps": total_steps} if "total_steps" in accepts else {}


def lightning_scheduler(scheduler: Any, *, validates_by_step: float | None) -> dict[str, Any]:
    """Lightning's lr_scheduler entry: stepped per optimizer step unless the schedule says per epoch;
    a plateau schedule also names the metric it watches.

    `validates_by_step` is the optimizer step of the run's first validation (None: the run never
    validates), which a plateau schedule needs before its last step.
    """
    config = {"scheduler": scheduler, "interval": getattr(scheduler, "interval", "step")}
    if not isinstance(scheduler, ValidationPlateau):
        return config
    if validates_by_step is None:
        raise ConfigError(
            "scheduler=plateau divides the LR when validation stops improving, but this run never validates "
            "before its last step: lower trainer.val_check_interval (or raise trainer.limit_val_batches above 0), "
            "or choose scheduler=step_decay/cosine"
        )
    # Lightning's strict check would fail on every step before the first validation has logged val/bpb,
    # and its non-strict one warns on each of them: both describe the expected start of a run.
    warnings.filterwarnings("ignore", message=f"ReduceLROnPlateau conditioned on metric {scheduler.monitor} which")
    return {**config, "monitor": scheduler.monitor, "frequency": 1, "strict": False, "reduce_on_plateau": True}
