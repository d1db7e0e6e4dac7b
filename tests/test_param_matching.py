"""Parameter matching reaches 10% wherever the architecture can, else refuses in one line."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from lmlab.errors import ConfigError
from lmlab.models import count_parameters
from lmlab.run.build import build
from lmlab.run.sizing import TOLERANCE, match_params, target_shape
from tests.helpers import MODELS, compose_config


@cache
def model_config(model: str):
    return compose_config([f"model={model}"], Path("unused")).model


@pytest.mark.parametrize("target", [20_000, 35_000, 50_000])
@pytest.mark.parametrize("model", MODELS)
def test_small_targets_land_within_ten_percent(model, target):
    match = match_params(model_config(model), 65, target)
    assert abs(match.off(target)) <= TOLERANCE, match
    cfg = model_config(model).copy()
    cfg.update(match.settings)
    assert count_parameters(build(cfg, "model", vocab_size=65)) == match.params  # the count is the built model's


def test_the_configured_shape_is_kept_when_it_can_reach_the_target():
    match = match_params(model_config("gpt"), 65, 2_000_000)
    assert (match.settings["n_layer"], match.settings["n_head"]) == (3, 4)


def test_a_large_vocabulary_is_reached_by_narrowing_the_heads():
    match = match_params(model_config("gpt"), 6818, 20_000)  # one 4-channel width step is 27k parameters here
    assert abs(match.off(20_000)) <= TOLERANCE and match.settings["n_head"] < 4


def test_a_target_below_what_the_vocabulary_costs_is_refused_naming_the_closest_count(tmp_path):
    cfg = compose_config(["model=gpt"], tmp_path)
    with pytest.raises(ConfigError) as refused:
        target_shape(cfg.model, 6818, 3_000)
    message = str(refused.value)
    assert "budget.target_params=3,000 is out of reach" in message and "the closest is" in message
    assert "\n" not in message
    closest = int(message.split("the closest is ")[1].split(" ")[0].replace(",", ""))
    assert closest > 6818  # one embedding column of 6,818 rows is already more than the target
