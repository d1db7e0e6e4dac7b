"""Learning-rate schedules.

They come in three kinds: per optimizer step (warmup + cosine/linear/constant/warmup-stable-decay,
which need the run's `total_steps`), per epoch (step decay) and per validation (plateau).
`lightning_scheduler` tells Lightning which is which.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from lmlab.errors import ConfigError


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


DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1 - progress,
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    "1-sqrt": lambda progress: 1 - math.sqrt(progress),
}


def warmup_stable_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 100,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, the peak rate for most of the run, then a short decay over its last
    `decay_fraction` of steps to `min_lr_ratio` x the peak (Hägele et al. 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations").

    Unlike cosine, the rate does not depend on the run's length until the decay starts, so one long
    stable phase can be branched into decays at several lengths. `decay_shape` is linear, cosine or
    1-sqrt (1 - sqrt(progress): drops fast, then flattens; the paper's best).
    """
    if not 0 < decay_fraction <= 1:
        raise ConfigError(
            f"task.scheduler.decay_fraction={decay_fraction} must be in (0, 1] (the share of the run's steps "
            "spent decaying): e.g. task.scheduler.decay_fraction=0.2"
        )
    if decay_shape not in DECAY_SHAPES:
        raise ConfigError(
            f"task.scheduler.decay_shape={decay_shape!r} is not one of {', '.join(DECAY_SHAPES)}: "
            "e.g. task.scheduler.decay_shape=1-sqrt"
        )
    shape = DECAY_SHAPES[decay_shape]
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, max(0.0, (step - decay_start) / decay_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * shape(progress)

    return LambdaLR(optimizer, factor)


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
