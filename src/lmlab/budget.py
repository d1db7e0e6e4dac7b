"""Equal-budget training: the same number of training *bytes* of text for every tokenizer.

A step budget is unfair across tokenizers: 1,000 steps of characters read about a third of the
text that 1,000 steps of BPE tokens read. `trainer.max_bytes` fixes the amount of text instead and
converts it, per run, to the `max_steps` that reads that many bytes:

    steps = max_bytes / (bytes per token x batch_size x block_size x accumulate_grad_batches x devices)

rounded to the nearest step, so runs of one sweep read the same text to within one optimizer step.
The validation interval is then nudged (to between half and all of `trainer.val_check_interval`) so
that the last validation falls on the final step, or a few steps before it: a run's score then
covers (nearly) all of its budget, not only the part before its last scheduled validation.

Wall-clock budgets use Lightning's own `trainer.max_time`. The learning-rate schedule still decays
over a step count, so a time-bounded run must also name one (`trainer.max_steps` or
`trainer.max_bytes`): the run then stops at whichever limit comes first. A run cut short by time
ends before its schedule does, so equal-time comparisons read best with `scheduler=constant`.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from omegaconf import DictConfig, open_dict

from lmlab.data import TextDataModule
from lmlab.errors import ConfigError

log = logging.getLogger(__name__)


def pop_byte_budget(cfg: DictConfig) -> int | None:
    """Remove `trainer.max_bytes` (not a Trainer argument) and check the LR schedule has a horizon."""
    with open_dict(cfg.trainer):
        max_bytes = cfg.trainer.pop("max_bytes", None)
    if max_bytes is not None and int(max_bytes) < 1:
        raise ConfigError(f"trainer.max_bytes must be a positive number of bytes (got {max_bytes})")
    unbounded = cfg.trainer.get("max_steps", -1) in (None, -1) and cfg.trainer.get("max_epochs", -1) in (None, -1)
    if cfg.get("scheduler") and max_bytes is None and unbounded:
        raise ConfigError(
            "the learning-rate schedule needs a length: set trainer.max_steps or trainer.max_bytes "
            "(trainer.max_time may still stop the run earlier), or use scheduler=null"
        )
    return None if max_bytes is None else int(max_bytes)


def bytes_per_step(datamodule: TextDataModule, trainer: pl.Trainer) -> float:
    """Bytes of training text one optimizer step reads, over all devices."""
    tokens = datamodule.batch_size * datamodule.block_size * trainer.accumulate_grad_batches * trainer.world_size
    return tokens * datamodule.train_bytes_per_token


def validation_interval(steps: int, interval: int) -> int:
    """The interval in [interval/2, interval] that leaves the fewest steps after the last validation."""
    if interval >= steps:
        return steps
    return min(range(interval, (interval - 1) // 2, -1), key=lambda k: steps % k)  # ties: the longest


def apply_byte_budget(trainer: pl.Trainer, cfg: DictConfig, datamodule: TextDataModule, max_bytes: int) -> int:
    """Set the trainer's max_steps to read `max_bytes` of training text; returns the steps.

    The config gets the same max_steps and validation interval, so config.yaml and the dashboards
    show what ran.
    """
    steps = max(1, round(max_bytes / bytes_per_step(datamodule, trainer)))
    trainer.fit_loop.epoch_loop.max_steps = steps
    with open_dict(cfg.trainer):
        cfg.trainer.max_steps = steps
        if isinstance(trainer.val_check_interval, int):
            trainer.val_check_interval = validation_interval(steps, trainer.val_check_interval)
            cfg.trainer.val_check_interval = trainer.val_check_interval
    log.info(
        f"trainer.max_bytes={max_bytes:,}: {steps:,} steps of "
        f"{bytes_per_step(datamodule, trainer):,.0f} bytes at {datamodule.train_bytes_per_token:.3f} bytes/token"
    )
    return steps
