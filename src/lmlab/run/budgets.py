"""Matched budgets: the same training text (`budget.max_bytes`) for every tokenizer.

A step budget is unfair across tokenizers: 1,000 steps of characters read about a third of the
text that 1,000 steps of BPE tokens read. `budget.max_bytes` fixes the amount of text instead and
converts it, per run, to the `max_steps` that reads that many bytes:

    steps = max_bytes / (bytes per token x batch_size x block_size x accumulate_grad_batches x devices)

rounded to the nearest step, so runs of one sweep read the same text to within one optimizer step.
The validation interval is then nudged (to between half and all of `trainer.val_check_interval`) so
that the scheduled validations end on the final step, or a few steps before it: the curve's points
stay evenly spaced. (Every run also validates on its last step, LanguageModelTask.on_train_batch_end,
so its score covers all of its budget either way.)

A compute budget (`budget.max_flops`) is the same idea in training FLOPs, the x axis of scaling
studies: each run gets the steps whose FLOPs come nearest to it,

    steps = max_flops / (model.flops_per_token(block_size) x tokens per step)

with tokens per step = batch_size x block_size x accumulate_grad_batches x devices. It suits runs of
one tokenizer (scaling studies); across tokenizers `budget.max_bytes` keeps the text equal instead,
so the two budgets are exclusive.

Both are settled in the run's plan (lmlab.run.plan.resolve_run) before the Trainer is built: it
gets its max_steps and validation interval up front, and config.yaml records them.

Wall-clock budgets use Lightning's own `trainer.max_time`. The learning-rate schedule still decays
over a step count, so a time-bounded run must also name one (`trainer.max_steps` or
`budget.max_bytes`): the run then stops at whichever limit comes first. A run cut short by time
ends before its schedule does, so equal-time comparisons read best with `scheduler=constant`.
Parameter matching (`budget.target_params`) is lmlab.run.sizing.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from lmlab.errors import ConfigError

log = logging.getLogger(__name__)


def byte_budget(cfg: DictConfig) -> int | None:
    """`budget.max_bytes`, checked, after checking that the LR schedule has a horizon."""
    max_bytes = cfg.budget.get("max_bytes")
    if max_bytes is not None and int(max_bytes) < 1:
        raise ConfigError(f"budget.max_bytes must be a positive number of bytes (got {max_bytes})")
    unbounded = cfg.trainer.get("max_steps", -1) in (None, -1) and cfg.trainer.get("max_epochs", -1) in (None, -1)
    if cfg.task.get("scheduler") and max_bytes is None and cfg.budget.get("max_flops") is None and unbounded:
        raise ConfigError(
            "the learning-rate schedule needs a length: set trainer.max_steps, budget.max_bytes or "
            "budget.max_flops (trainer.max_time may still stop the run earlier), or use scheduler=null"
        )
    return None if max_bytes is None else int(max_bytes)


def flops_budget(cfg: DictConfig) -> float | None:
    """`budget.max_flops`, checked: positive, and not combined with `budget.max_bytes`."""
    max_flops = cfg.budget.get("max_flops")
    if max_flops is None:
        return None
    if float(max_flops) <= 0:
        raise ConfigError(f"budget.max_flops must be a positive number of training FLOPs (got {max_flops}), e.g. 1e13")
    if cfg.budget.get("max_bytes") is not None:
        raise ConfigError(
            "budget.max_flops and budget.max_bytes both set a run's steps: keep one "
            "(budget.max_bytes=null for equal compute, budget.max_flops=null for equal text)"
        )
    return float(max_flops)


def tokens_per_step(batch_size: int, block_size: int, accumulate_grad_batches: int, world_size: int) -> int:
    """Training tokens one optimizer step reads, over all devices."""
    return batch_size * block_size * accumulate_grad_batches * world_size


def validation_interval(steps: int, interval: int) -> int:
    """The interval in [interval/2, interval] that leaves the fewest steps after the last validation."""
    if interval >= steps:
        return steps
    return min(range(interval, (interval - 1) // 2, -1), key=lambda k: steps % k)  # ties: the longest


def steps_for_bytes(max_bytes: int, bytes_per_step: float) -> int:
    """The optimizer steps that read `max_bytes` of training text (the nearest step, at least one)."""
    steps = max(1, round(max_bytes / bytes_per_step))
    log.info(f"budget.max_bytes={max_bytes:,}: {steps:,} steps of {bytes_per_step:,.0f} bytes")
    return steps


def steps_for_flops(max_flops: float, flops_per_token: int, tokens: int) -> int:
    """The optimizer steps whose training FLOPs come nearest to `max_flops`, at `tokens` per step.

    A budget below one step's FLOPs is refused rather than rounded up to a step it does not pay for.
    """
    per_step = flops_per_token * tokens
    if max_flops < per_step:
        raise ConfigError(
            f"budget.max_flops={max_flops:.3g} is less than one training step of this run ({per_step:.3g} FLOPs: "
            f"{flops_per_token:,} per token x {tokens:,} tokens per step): raise budget.max_flops to at least "
            f"{per_step:.3g}, or shrink the model or the batch"
        )
    steps = round(max_flops / per_step)
    log.info(
        f"budget.max_flops={max_flops:.3g}: {steps:,} steps of {per_step:.3g} FLOPs ({flops_per_token:,} per token)"
    )
    return steps
