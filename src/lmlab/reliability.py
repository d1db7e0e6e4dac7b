"""Checks that keep a run from losing or overwriting work, made before any step is trained.

An earlier run's results are never overwritten, a settings mistake that would only surface
mid-run fails before it costs time, and config values that name files cannot write outside the
run directory. `train()` calls these; each raises a one-line ConfigError.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint

from lmlab.errors import ConfigError
from lmlab.io import safe_output_path
from lmlab.models import LanguageModel

log = logging.getLogger(__name__)


def finished_status(run_dir: Path) -> str | None:
    """The `status` of the run whose metrics.json is in `run_dir`, or None when it has none."""
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def continue_unfinished_run(cfg: DictConfig) -> DictConfig:
    """The config to run given the run directory's contents: never on top of another run's results.

    A directory with an unfinished run's `checkpoints/last.ckpt` (killed, interrupted, diverged) and
    no explicit `ckpt_path` resumes from it, so rerunning the same command continues the run; a
    finished run's directory, or one holding checkpoints with no last.ckpt, is refused. An explicit
    `ckpt_path` continues in its own run's directory and is left to `lmlab.resume`.
    """
    if cfg.get("ckpt_path"):
        return cfg
    run_dir = Path(cfg.paths.output_dir)
    if finished_status(run_dir) == "completed":
        raise ConfigError(
            f"{run_dir} already holds a finished run (metrics.json): leave hydra.run.dir unset "
            "for a new directory, or pass ckpt_path= to continue training it"
        )
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        if any((run_dir / "checkpoints").glob("*.ckpt")):
            raise ConfigError(
                f"{run_dir} holds another run's checkpoints but no last.ckpt to resume from: "
                "pass ckpt_path=<one of them> or choose a new hydra.run.dir"
            )
        return cfg
    if cfg.get("init_from"):
        raise ConfigError(
            f"{run_dir} holds an unfinished run: fine-tune (init_from=) into a new directory, "
            "leaving hydra.run.dir unset"
        )
    log.info("%s holds an unfinished run: resuming it from %s", run_dir, last)
    resumed = cfg.copy()
    with open_dict(resumed):
        resumed.ckpt_path = str(last)
    return resumed


def check_training_length(trainer_cfg: Any) -> None:
    """A run that would train zero steps is a typo, not an experiment."""
    steps, epochs = int(trainer_cfg.get("max_steps", -1)), int(trainer_cfg.get("max_epochs", -1) or -1)
    if steps == 0 or steps < -1 or (steps == -1 and epochs == 0):
        raise ConfigError(
            f"trainer.max_steps={steps} trains nothing: set trainer.max_steps to a positive number "
            "of optimizer steps (or -1 with trainer.max_epochs > 0)"
        )


def check_context_fits(model: LanguageModel, block_size: int) -> None:
    """The training windows must fit the model's positional table, or the first step would fail."""
    if model.context_length is not None and block_size > model.context_length:
        raise ConfigError(
            f"data.block_size={block_size} is longer than the model's context "
            f"(model.block_size={model.context_length}): set model.block_size >= data.block_size, "
            "or leave it at its default ${data.block_size}"
        )


def check_output_paths(trainer: pl.Trainer, run_dir: Path) -> None:
    """Every file location the config gives the trainer must be inside the run directory:
    checkpoint folders and names, logger folders, and callbacks that write a file (`path`)."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folder = safe_output_path(run_dir, callback.dirpath, "callbacks.model_checkpoint.dirpath")
            safe_output_path(folder, f"{callback.filename or ''}.ckpt", "callbacks.model_checkpoint.filename")
        elif isinstance(getattr(callback, "path", None), (str, Path)):
            safe_output_path(run_dir, callback.path, f"the path of callback {type(callback).__name__}")
    for logger in trainer.loggers:
        if logger.log_dir:
            safe_output_path(run_dir, logger.log_dir, f"the folder of logger {type(logger).__name__}")


def check_optimization(optimizer: Callable[..., torch.optim.Optimizer], label_smoothing: float) -> None:
    """Settings torch would only reject at the first step: the optimizer's, tried on a dummy
    parameter (a negative lr, betas outside [0, 1)), and the label smoothing."""
    try:
        optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid optimizer config: {err}") from None
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1] (got {label_smoothing}): e.g. label_smoothing=0.1")
