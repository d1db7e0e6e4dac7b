"""Checks that keep a run from losing or overwriting work, made before any step is trained.

An earlier run's results are never overwritten, a settings mistake that would only surface
mid-run fails before it costs time, and config values that name files cannot write outside the
run directory. `train()` calls these; each raises a one-line ConfigError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger

from lmlab.errors import ConfigError
from lmlab.io import safe_output_path
from lmlab.models import LanguageModel


def check_training_length(trainer_cfg: Any) -> None:
    """A run that would train zero steps is a typo, not an experiment."""
    steps, epochs = int(trainer_cfg.get("max_steps", -1)), int(trainer_cfg.get("max_epochs", -1) or -1)
    if steps == 0 or steps < -1 or (steps == -1 and epochs == 0):
        raise ConfigError(
            f"trainer.max_steps={steps} trains nothing: set trainer.max_steps to a positive number "
            "of optimizer steps (or -1 with trainer.max_epochs > 0)"
        )


SEED_RANGE = (0, 2**32 - 1)  # what numpy's and torch's generators accept


def check_run_settings(cfg: Any) -> None:
    """Settings that would otherwise fail deep inside a library with a traceback, or be taken silently."""
    seed = cfg.get("seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ConfigError(f"seed={seed} must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}: e.g. seed=1337")
    max_time = cfg.trainer.get("max_time")
    if max_time is not None and not isinstance(max_time, (str, Mapping)):
        raise ConfigError(
            f"trainer.max_time={max_time} is not a duration: give DD:HH:MM:SS (e.g. 00:01:30:00), "
            "a mapping such as {hours: 1}, or null for no limit"
        )
    scheduler = cfg.task.get("scheduler") or {}
    warmup = scheduler.get("warmup_steps", 0) if isinstance(scheduler, Mapping) else 0
    if not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0):
        raise ConfigError(f"task.scheduler.warmup_steps={warmup} must be a whole number >= 0 (0: no warmup)")


def check_context_fits(model: LanguageModel, block_size: int) -> None:
    """The training windows must fit the model's positional table, or the first step would fail."""
    if model.context_length is not None and block_size > model.context_length:
        raise ConfigError(
            f"data.block_size={block_size} is longer than the model's context "
            f"(model.block_size={model.context_length}): set model.block_size >= data.block_size, "
            "or leave it at its default ${data.block_size}"
        )


def check_output_paths(run_dir: Path, callbacks: Mapping[str, pl.Callback], loggers: Sequence[Logger]) -> None:
    """Every file location the config gives the trainer must be inside the run directory:
    checkpoint folders and names, logger folders, and callbacks that write a file (`path`).
    `callbacks` maps each config name (callbacks.<name>) to the callback built from it."""
    for name, callback in callbacks.items():
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folder = safe_output_path(run_dir, callback.dirpath, f"callbacks.{name}.dirpath")
            safe_output_path(folder, f"{callback.filename or ''}.ckpt", f"callbacks.{name}.filename")
        elif isinstance(getattr(callback, "path", None), (str, Path)):
            safe_output_path(run_dir, callback.path, f"the path of callback {type(callback).__name__}")
    for logger in loggers:
        if logger.log_dir:
            safe_output_path(run_dir, logger.log_dir, f"the folder of logger {type(logger).__name__}")


def check_optimizer(optimizer: Callable[..., torch.optim.Optimizer]) -> None:
    """Settings torch would only reject at the first step (a negative lr, betas outside [0, 1)),
    tried on a dummy parameter."""
    try:
        optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid optimizer config: {err}") from None


def check_stateful(model: LanguageModel, stateful: bool) -> None:
    """Carrying state across batches needs a model whose state is a summary of all it read (a recurrent
    net); an attention model's window has no such state, so `data.stateful` would silently do nothing."""
    if stateful and model.context_length is not None:
        raise ConfigError(
            f"data.stateful=true needs a recurrent model, but {type(model).__name__} attends over a window of "
            f"{model.context_length} tokens and carries no state across batches: set data.stateful=false"
        )
