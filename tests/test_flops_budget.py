"""budget.max_flops: a compute budget becomes the steps that spend it, and bad budgets fail in one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl

from lmlab.errors import ConfigError
from lmlab.run.budgets import apply_flops_budget, byte_budget, flops_budget
from tests.helpers import compose_config


def _trainer(accumulate: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1500,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        val_check_interval=500,
    )


class _Model:
    """A model as the budget sees it: only its training FLOPs per token, at a context it must be asked for."""

    def __init__(self, per_token: int) -> None:
        self.per_token, self.asked = per_token, []

    def flops_per_token(self, seq_len: int) -> int:
        self.asked.append(seq_len)
        return self.per_token


DATA = SimpleNamespace(batch_size=8, block_size=32, train_bytes_per_token=1.0)


@pytest.mark.parametrize("per_token,accumulate", [(600_000, 1), (1_234_567, 2), (60_000_000, 1)])
def test_a_flops_budget_becomes_the_steps_that_spend_it(tmp_path, per_token, accumulate):
    cfg = compose_config(["budget.max_flops=3e12", f"trainer.accumulate_grad_batches={accumulate}"], tmp_path)
    max_flops = flops_budget(cfg)
    assert max_flops == 3e12
    trainer, model = _trainer(accumulate), _Model(per_token)
    steps = apply_flops_budget(trainer, cfg, DATA, model, max_flops)
    per_step = per_token * 8 * 32 * accumulate
    assert model.asked == [32]  # the FLOPs of the context the run trains at
    assert trainer.max_steps == steps == cfg.trainer.max_steps
    assert abs(steps * per_step - 3e12) <= per_step / 2  # the nearest step
    assert steps % trainer.val_check_interval <= 2 or trainer.val_check_interval == steps  # last validation at the end


def test_a_budget_too_small_for_one_step_is_one_line_naming_the_minimum(tmp_path):
    cfg = compose_config(["budget.max_flops=1e8"], tmp_path)  # one step: 600,000 FLOPs x 8 x 32 tokens = 1.54e8
    with pytest.raises(ConfigError) as err:
        apply_flops_budget(_trainer(), cfg, DATA, _Model(600_000), flops_budget(cfg))
    message = str(err.value)
    assert "\n" not in message and "budget.max_flops=1e+08 is less than one training step" in message
    assert "raise budget.max_flops to at least 1.54e+08" in message
    cfg = compose_config(["budget.max_flops=1.54e8"], tmp_path)
    assert apply_flops_budget(_trainer(), cfg, DATA, _Model(600_000), flops_budget(cfg)) == 1


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["budget.max_flops=0"], "budget.max_flops must be a positive number"),
        (["budget.max_flops=-1e12"], "budget.max_flops must be a positive number"),
        (["budget.max_flops=1e12", "budget.max_bytes=100000"], "budget.max_flops and budget.max_bytes both set"),
    ],
)
def test_bad_flops_budgets_are_config_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        flops_budget(compose_config(overrides, tmp_path))


def test_a_flops_budget_gives_the_schedule_its_length(tmp_path):
    cfg = compose_config(["trainer.max_time=00:00:01:00", "trainer.max_steps=-1", "budget.max_flops=1e12"], tmp_path)
    assert byte_budget(cfg) is None  # no "the learning-rate schedule needs a length" error
    assert flops_budget(compose_config([], tmp_path)) is None
