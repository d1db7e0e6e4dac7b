"""budget.max_flops: a compute budget becomes the steps that spend it, and bad budgets fail in one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmlab.data.eval_context import EvalProtocol
from lmlab.errors import ConfigError
from lmlab.run.budgets import byte_budget, flops_budget, steps_for_flops, tokens_per_step
from lmlab.run.build import build
from lmlab.run.plan import resolve_run
from tests.helpers import compose_config

DATA = SimpleNamespace(
    batch_size=8,
    block_size=32,
    train_bytes_per_token=1.0,
    tokenizer=SimpleNamespace(vocab_size=65),
    eval_protocol=EvalProtocol("window"),
)


@pytest.mark.parametrize("per_token,accumulate", [(600_000, 1), (1_234_567, 2), (60_000_000, 1)])
def test_a_flops_budget_becomes_the_steps_that_spend_it(per_token, accumulate):
    tokens = tokens_per_step(batch_size=8, block_size=32, accumulate_grad_batches=accumulate, world_size=1)
    steps = steps_for_flops(3e12, per_token, tokens)
    per_step = per_token * 8 * 32 * accumulate
    assert abs(steps * per_step - 3e12) <= per_step / 2  # the nearest step


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_plan_gives_the_trainer_the_steps_of_its_flops_budget_up_front(tmp_path, accumulate):
    overrides = ["budget.max_flops=3e12", f"trainer.accumulate_grad_batches={accumulate}", "trainer.accelerator=cpu"]
    cfg = compose_config([*overrides, "trainer.devices=1", "trainer.val_check_interval=500"], tmp_path)
    plan = resolve_run(cfg, DATA)
    per_step = (
        build(plan.model, "model", vocab_size=65).flops_per_token(32) * 8 * 32 * accumulate
    )  # at the run's context
    steps, interval = plan.trainer.max_steps, plan.trainer.val_check_interval
    assert abs(steps * per_step - 3e12) <= per_step / 2
    assert steps % interval <= 2 or interval == steps  # last validation at the end
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval) == (2000, 500)  # the config given is left as it is
    trainer = build(plan.trainer, "trainer", logger=False, callbacks=[])
    assert (trainer.max_steps, trainer.val_check_interval) == (steps, interval)


def test_a_budget_too_small_for_one_step_is_one_line_naming_the_minimum():
    with pytest.raises(ConfigError) as err:  # one step: 600,000 FLOPs x 8 x 32 tokens = 1.54e8
        steps_for_flops(1e8, 600_000, 8 * 32)
    message = str(err.value)
    assert "\n" not in message and "budget.max_flops=1e+08 is less than one training step" in message
    assert "raise budget.max_flops to at least 1.54e+08" in message
    assert steps_for_flops(1.54e8, 600_000, 8 * 32) == 1


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
