"""Fair by construction: parameter-matched widths and equal-byte budgets (lmlab.run.budgets)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import open_dict

from lmlab.data.eval_context import EvalProtocol
from lmlab.errors import ConfigError
from lmlab.models import count_parameters
from lmlab.run.budgets import byte_budget, validation_interval
from lmlab.run.build import build
from lmlab.run.plan import resolve_run
from lmlab.run.sizing import match_width, target_shape
from tests.helpers import MODELS, compose_config

VOCABS = {"char": 65, "bpe": 1024, "word": 6000}


@cache
def model_config(model: str):
    """The composed config of `model`, composed once: match_width only reads it."""
    return compose_config([f"model={model}"], Path("unused")).model


@pytest.mark.parametrize("vocab", VOCABS.values(), ids=VOCABS.keys())
@pytest.mark.parametrize("target", [100_000, 2_000_000])
@pytest.mark.parametrize("model", MODELS)
def test_matched_width_lands_within_ten_percent_of_the_target(model, target, vocab):
    config = model_config(model)
    d_model, params = match_width(config, vocab, target)
    assert abs(params / target - 1) < 0.10, (d_model, params)
    if "n_head" in config:
        assert d_model % config.n_head == 0


def test_the_reported_count_is_the_built_model_s_count(tmp_path):
    cfg = compose_config(["model=transformer", "budget.target_params=300000"], tmp_path)
    ratio = cfg.model.d_ff / cfg.model.d_model
    settings = target_shape(cfg.model, 1024, cfg.budget.target_params)
    model = build(cfg.model, "model", vocab_size=1024, **settings)
    assert settings["d_ff"] / settings["d_model"] == pytest.approx(ratio, rel=0.02)  # the d_ff/d_model ratio is kept
    assert abs(count_parameters(model) / 300_000 - 1) < 0.10
    assert match_width(cfg.model, 1024, 300_000)[1] == count_parameters(model)


def test_depth_and_other_settings_are_kept(tmp_path):
    cfg = compose_config(["model=lstm", "model.n_layer=3", "budget.target_params=500000"], tmp_path)
    plan = resolve_run(cfg, _datamodule(1.0, vocab_size=65))
    assert (plan.model.n_layer, plan.model.cell, plan.model.dropout) == (3, "lstm", 0.2)
    assert plan.model.d_model != cfg.model.d_model  # the plan's width; the config given is left as it is


def test_without_a_target_the_width_is_untouched(tmp_path):
    cfg = compose_config(["model=gpt"], tmp_path)
    assert target_shape(cfg.model, 65, None) == {}
    assert resolve_run(cfg, _datamodule(1.0, vocab_size=65)).model.d_model == 128


def test_a_non_positive_target_is_a_config_error(tmp_path):
    cfg = compose_config(["model=gru", "budget.target_params=0"], tmp_path)
    with pytest.raises(ConfigError, match="budget.target_params must be a positive"):
        target_shape(cfg.model, 65, cfg.budget.target_params)


def _datamodule(bytes_per_token: float, vocab_size: int = 65):
    """The prepared data as the plan reads it."""
    tokenizer = SimpleNamespace(vocab_size=vocab_size)
    return SimpleNamespace(
        batch_size=8,
        block_size=32,
        train_bytes_per_token=bytes_per_token,
        tokenizer=tokenizer,
        eval_protocol=EvalProtocol("window"),
    )


@pytest.mark.parametrize("bytes_per_token", [1.0, 1.37, 3.9])
def test_a_byte_budget_becomes_the_steps_that_read_it(tmp_path, bytes_per_token):
    overrides = ["budget.max_bytes=100000", "trainer.accumulate_grad_batches=2", "trainer.accelerator=cpu"]
    cfg = compose_config([*overrides, "trainer.devices=1", "trainer.val_check_interval=500"], tmp_path)
    max_bytes = byte_budget(cfg)
    assert max_bytes == 100_000
    plan = resolve_run(cfg, _datamodule(bytes_per_token))
    trainer = build(plan.trainer, "trainer", logger=False, callbacks=[])  # given its steps up front
    steps = plan.trainer.max_steps
    per_step = 8 * 32 * 2 * bytes_per_token
    assert trainer.max_steps == steps != cfg.trainer.max_steps
    assert abs(steps * per_step - 100_000) <= per_step / 2  # nearest step: within half a batch of the budget
    assert 250 <= trainer.val_check_interval <= 500 or trainer.val_check_interval == steps
    assert steps % trainer.val_check_interval <= 2  # the score covers (nearly) the whole budget


@pytest.mark.parametrize("steps,interval,expected", [(165, 100, 55), (610, 100, 61), (80, 100, 80), (500, 100, 100)])
def test_the_last_validation_lands_on_the_final_step(steps, interval, expected):
    assert validation_interval(steps, interval) == expected


def test_a_time_budget_needs_a_step_horizon_for_the_schedule(tmp_path):
    cfg = compose_config(["trainer.max_time=00:00:01:00", "trainer.max_steps=-1"], tmp_path)
    with pytest.raises(ConfigError, match="learning-rate schedule needs a length"):
        byte_budget(cfg)
    for fix in (["trainer.max_steps=100000"], ["budget.max_bytes=1000000", "trainer.max_steps=-1"]):
        assert byte_budget(compose_config(["trainer.max_time=00:00:01:00", *fix], tmp_path)) in (None, 1_000_000)
    no_schedule = compose_config(["trainer.max_time=00:00:01:00", "trainer.max_steps=-1"], tmp_path)
    with open_dict(no_schedule):
        no_schedule.task.scheduler = None
    assert byte_budget(no_schedule) is None
