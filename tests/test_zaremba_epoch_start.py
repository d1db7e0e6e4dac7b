"""bench/zaremba_epoch_start.py: the Torch code's epoch start, for a side-by-side PTB measurement.

Runs the shrunk PTB recipe through train.py's config path with the callback added as the bench's
command line adds it, and records the state each epoch's first training step starts from.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lmlab.run.train import train
from tests.helpers import compose_config
from tests.test_recipes import tiny_ptb_overrides, write_ptb_like

EPOCH_START = "+callbacks.epoch_start._target_=bench.zaremba_epoch_start.ValidationStateAtEpochStart"
RECORD = "+callbacks.zz_record._target_=tests.test_zaremba_epoch_start.Recorder"


def _copy(state):
    return None if state is None else tuple(s.detach().clone() for s in state)


class Recorder(pl.Callback):
    """Kept on the class: Hydra builds the instance inside train()."""

    starts: dict[int, object] = {}
    validations: list[object] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            Recorder.validations.append(_copy(pl_module._eval_state))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            Recorder.starts[trainer.current_epoch] = (_copy(pl_module.carried_state), len(Recorder.validations))


@pytest.fixture
def recorded(tmp_path):
    Recorder.starts, Recorder.validations = {}, []
    write_ptb_like(tmp_path / "ptb")

    def run(*extra: str) -> Recorder:
        overrides = tiny_ptb_overrides(
            "ptb_lstm_medium", tmp_path / "ptb", "data.eval_batch_size=4", *extra, RECORD
        )  # recorded last
        metrics = train(compose_config(overrides, tmp_path / "run"))
        assert metrics["status"] == "completed"
        return Recorder

    return run


def test_the_second_epoch_starts_from_the_first_validations_last_state(recorded):
    seen = recorded(EPOCH_START)
    first, _ = seen.starts[0]
    assert first is None  # the first epoch starts from zeros, as the Torch code's does
    given, validations_before = seen.starts[1]
    assert validations_before == 1
    for got, want in zip(given, seen.validations[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.abs().sum() > 0


def test_without_it_every_epoch_starts_from_zeros(recorded):
    seen = recorded()
    assert seen.starts[0][0] is None and seen.starts[1][0] is None


def test_a_validation_with_other_streams_is_refused(recorded):
    with pytest.raises(RuntimeError, match="set data.eval_batch_size=4"):
        recorded(EPOCH_START, "data.eval_batch_size=1")
