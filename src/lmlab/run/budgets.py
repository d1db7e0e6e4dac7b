"""Matched budgets: the same training text (`budget.max_bytes`) and the same size (`budget.target_params`).

A step budget is unfair across tokenizers: 1,000 steps of characters read about a third of the
text that 1,000 steps of BPE tokens read. `budget.max_bytes` fixes the amount of text instead and
converts it, per run, to the `max_steps` that reads that many bytes:

    steps = max_bytes / (bytes per token x batch_size x block_size x accumulate_grad_batches x devices)

rounded to the nearest step, so runs of one sweep read the same text to within one optimizer step.
The validation interval is then nudged (to between half and all of `trainer.val_check_interval`) so
that the last validation falls on the final step, or a few steps before it: a run's score then
covers (nearly) all of its budget, not only the part before its last scheduled validation.

Wall-clock budgets use Lightning's own `trainer.max_time`. The learning-rate schedule still decays
over a step count, so a time-bounded run must also name one (`trainer.max_steps` or
`budget.max_bytes`): the run then stops at whichever limit comes first. A run cut short by time
ends before its schedule does, so equal-time comparisons read best with `scheduler=constant`.

Parameter matching (`budget.target_params=N`) keeps every model setting but the width and picks the
`d_model` whose exact parameter count is nearest to N. The vocabulary (and so the embedding's share)
is only known once the tokenizer is trained, which is why this runs right before the model is built.
Counting is done by building the model on PyTorch's meta device: exact, free of memory, and without
a second copy of each architecture's parameter formula.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict

from lmlab.data import TextDataModule
from lmlab.errors import ConfigError
from lmlab.models import count_parameters
from lmlab.run.build import build

log = logging.getLogger(__name__)


def byte_budget(cfg: DictConfig) -> int | None:
    """`budget.max_bytes`, checked, after checking that the LR schedule has a horizon."""
    max_bytes = cfg.budget.get("max_bytes")
    if max_bytes is not None and int(max_bytes) < 1:
        raise ConfigError(f"budget.max_bytes must be a positive number of bytes (got {max_bytes})")
    unbounded = cfg.trainer.get("max_steps", -1) in (None, -1) and cfg.trainer.get("max_epochs", -1) in (None, -1)
    if cfg.task.get("scheduler") and max_bytes is None and unbounded:
        raise ConfigError(
            "the learning-rate schedule needs a length: set trainer.max_steps or budget.max_bytes "
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
        f"budget.max_bytes={max_bytes:,}: {steps:,} steps of "
        f"{bytes_per_step(datamodule, trainer):,.0f} bytes at {datamodule.train_bytes_per_token:.3f} bytes/token"
    )
    return steps


MAX_WIDTH_STEPS = 1 << 16  # widths are searched up to 65,536 x the width step


def parameters_at_width(model_cfg: DictConfig, vocab_size: int, d_model: int) -> int:
    """The exact parameter count of `model_cfg` built with width `d_model` (and a d_ff scaled with it)."""
    node = model_cfg.copy()  # keeps its parent, so interpolations like ${data.block_size} still resolve
    with torch.device("meta"):
        model = build(node, "model", vocab_size=vocab_size, **_width_settings(model_cfg, d_model))
    return count_parameters(model)


def _width_settings(model_cfg: DictConfig, d_model: int) -> dict[str, int]:
    """d_model, plus d_ff kept at the configured d_ff/d_model ratio where the model has one."""
    settings = {"d_model": d_model}
    if model_cfg.get("d_ff") is not None:
        settings["d_ff"] = max(1, round(model_cfg.d_ff / model_cfg.d_model * d_model))
    return settings


def match_width(model_cfg: DictConfig, vocab_size: int, target_params: int) -> tuple[int, int]:
    """(d_model, parameters) of the width closest to `target_params`; widths stay multiples of n_head.

    Parameters grow with width, so a doubling search brackets the target and a bisection finds the
    first width at or above it; the answer is that width or the one just below.
    """
    step = int(model_cfg.get("n_head") or 1)
    count = {}

    def params(k: int) -> int:
        if k not in count:
            count[k] = parameters_at_width(model_cfg, vocab_size, k * step)
        return count[k]

    high = 1
    while params(high) < target_params and high < MAX_WIDTH_STEPS:
        high *= 2
    low = high // 2  # params(low) < target, unless high is 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if params(middle) < target_params else (low, middle)
    best = min((k for k in (low, high) if k >= 1), key=lambda k: abs(params(k) - target_params))
    return best * step, params(best)


def apply_target_params(model_cfg: DictConfig, vocab_size: int, target: int | None) -> int | None:
    """If `target` (budget.target_params) is set, write the matched width into the model config.

    Returns the target, or None when the run is not parameter-matched.
    """
    if target is None:
        return None
    if int(target) < 1:
        raise ConfigError(f"budget.target_params must be a positive number of parameters (got {target})")
    if model_cfg.get("d_model") is None:
        raise ConfigError("budget.target_params needs a model with a d_model width: remove budget.target_params")
    d_model, params = match_width(model_cfg, vocab_size, int(target))
    with open_dict(model_cfg):
        model_cfg.update(_width_settings(model_cfg, d_model))
    off = params / int(target) - 1
    log.info(f"budget.target_params={int(target):,}: d_model={d_model} gives {params:,} parameters ({off:+.1%})")
    if abs(off) > 0.1:
        log.warning(
            f"the closest width is {off:+.1%} off budget.target_params={int(target):,}: "
            "change the depth (model.n_layer) or the vocabulary to get nearer"
        )
    return int(target)
