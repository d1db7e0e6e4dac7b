"""FSDP as the code around the strategy sees it: whether a run shards its weights, and the model with
its full weights for sampling.

Both the callbacks (a sample after each validation) and the training run (the final sample) ask, so
this sits below them; the strategy itself, its wrap policy and the distributed checks are in
lmlab.run.distributed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig


def uses_fsdp(strategy: Any) -> bool:
    """Whether `trainer.strategy` (a Lightning name like `fsdp`, or a node with a `_target_`) is FSDP."""
    if isinstance(strategy, str):
        return strategy.lower().startswith("fsdp")
    target = strategy.get("_target_", "") if isinstance(strategy, (DictConfig, dict)) else type(strategy).__name__
    return str(target).endswith("FSDPStrategy")


@contextmanager
def full_weights(trainer: pl.Trainer) -> Iterator[None]:
    """Inside: the LightningModule's model holds its full weights on every rank, so it can be called
    directly (sampling, generation) rather than through the FSDP wrapper; outside FSDP, nothing happens.

    Gathering is collective and so are the calls of the wrapped blocks inside, so every rank must
    enter and make the same number of model calls (lmlab's sampling always makes exactly
    `max_new_tokens` of them). `writeback=False`: what happens inside never changes the weights.
    """
    model = trainer.strategy.model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        # the blocks stay wrapped and cast their inputs to the mixed-precision dtype, while the gathered
        # weights are full precision: calls run under the trainer's precision context (autocast), as in training
        with (
            FSDP.summon_full_params(model, writeback=False, recurse=True),
            trainer.strategy.precision_plugin.forward_context(),
        ):
            yield
    else:
        yield
