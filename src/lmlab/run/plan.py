"""A run is a plan: every value derived from the config is settled here, once, before anything is built.

`resolve_run(cfg, data)` returns a new config in which `trainer.precision` is what the run trains in
(not `auto`), `eval` the protocol validation and test score with, the model has its matched width (`budget.target_params`), and `trainer.max_steps` and
`trainer.val_check_interval` are what the step budgets (`budget.max_bytes`, `budget.max_flops`)
make of them. config.yaml is written from the plan and the model, Trainer and task are built from
it and never edited afterwards, so the file rebuilds exactly the run that ran.

It needs the prepared data: the vocabulary sets the embedding's share of a matched width, and the
bytes per token turn a byte budget into steps.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, open_dict

from lmlab.data.eval_context import EvalProtocol
from lmlab.errors import ConfigError
from lmlab.lightning_compat import planned_world_size
from lmlab.run.budgets import (
    byte_budget,
    flops_budget,
    steps_for_bytes,
    steps_for_flops,
    tokens_per_step,
    validation_interval,
)
from lmlab.run.build import build
from lmlab.run.precision import planned_precision
from lmlab.run.sizing import target_shape


class _Vocabulary(Protocol):
    vocab_size: int


class PreparedData(Protocol):
    """What the plan reads of the prepared data (lmlab.data.TextDataModule after prepare_data)."""

    tokenizer: _Vocabulary
    batch_size: int
    block_size: int
    train_bytes_per_token: float
    eval_protocol: EvalProtocol


def resolve_run(cfg: DictConfig, data: PreparedData) -> DictConfig:
    """The run's plan: `cfg` with precision, matched width and step budget settled (`cfg` is left as it is)."""
    plan = copy.deepcopy(cfg)
    with open_dict(plan):
        plan.trainer.precision = planned_precision(plan.trainer)
        asked = plan.get("eval") or {}
        protocol = data.eval_protocol  # a window's stride is its length: not a setting to record
        plan.eval = {
            "context": protocol.mode,
            "stride": protocol.stride if protocol.mode == "sliding" else asked.get("stride"),
            "also_full": bool(asked.get("also_full", False)),
        }
        plan.model.update(target_shape(plan.model, data.tokenizer.vocab_size, plan.budget.get("target_params")))
        steps = budget_steps(plan, data)
        if steps is not None:
            plan.trainer.max_steps = steps
            interval = plan.trainer.get("val_check_interval")
            if isinstance(interval, int) and not isinstance(interval, bool):  # a fraction of an epoch stays one
                plan.trainer.val_check_interval = validation_interval(steps, interval)
    return plan


def budget_steps(plan: DictConfig, data: PreparedData) -> int | None:
    """The optimizer steps `budget.max_bytes` or `budget.max_flops` buys this run, or None without a budget."""
    max_bytes, max_flops = byte_budget(plan), flops_budget(plan)
    if max_bytes is None and max_flops is None:
        return None
    accumulate = int(plan.trainer.get("accumulate_grad_batches", 1) or 1)
    try:
        world_size = planned_world_size(plan.trainer)
    except MisconfigurationException as err:  # e.g. trainer.accelerator=gpu on a machine without one
        raise ConfigError(f"invalid trainer config: {' '.join(str(err).split())}") from None
    tokens = tokens_per_step(data.batch_size, data.block_size, accumulate, world_size)
    if max_bytes is not None:
        return steps_for_bytes(max_bytes, tokens * data.train_bytes_per_token)
    with torch.device("meta"):  # the FLOPs of the model as planned, without its memory
        model = build(plan.model, "model", vocab_size=data.tokenizer.vocab_size)
    return steps_for_flops(max_flops, model.flops_per_token(data.block_size), tokens)
