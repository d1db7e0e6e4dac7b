"""bench/scaling.py times optimizer steps, also when each is several micro-batches."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import scaling


@pytest.mark.parametrize("accumulate", [1, 3])
def test_the_step_timer_spans_exactly_the_timed_optimizer_steps(monkeypatch, accumulate):
    """The clock reads the micro-batch count: timing steps 2..5 must span 3 x `accumulate` micro-batches."""
    warmup, steps = 2, 3
    micro_batches = 0
    monkeypatch.setattr(scaling.time, "perf_counter", lambda: float(micro_batches))
    timer = scaling.StepTimer(warmup, steps)
    module = SimpleNamespace(device=torch.device("cpu"))
    for micro_batches in range(1, (warmup + steps) * accumulate + 1):
        trainer = SimpleNamespace(global_step=micro_batches // accumulate)  # Lightning's count after this batch
        timer.on_train_batch_end(trainer, module, None, None, micro_batches - 1)
    assert timer.seconds == steps * accumulate
