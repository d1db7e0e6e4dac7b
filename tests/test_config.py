"""Every option of every config group composes, and bad choices fail with Hydra's own message."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.utils import get_object

from tests.conftest import CONF, REPO, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
RECIPES = {"experiment", "hparams_search"}  # `# @package _global_` recipes, composed in tests/test_sweep.py
OPTIONS = [
    (group, option.stem) for group in GROUPS if group not in RECIPES for option in sorted((CONF / group).glob("*.yaml"))
]


def test_the_groups_the_product_promises_exist():
    assert {"data", "tokenizer", "model", "optimizer", "scheduler", "trainer", "logger", "callbacks"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_names_a_real_class(tmp_path, group, option):
    overrides = [f"{group}={option}"] + (
        ["data.path=some.txt"] if (group, option) in {("data", "text"), ("data", "hf")} else []
    )
    cfg = compose_config(overrides, tmp_path)
    node = cfg[group]
    targets = [node["_target_"]] if "_target_" in node else [v["_target_"] for v in node.values() if "_target_" in v]
    assert targets, f"{group}={option} names no _target_"
    for target in targets:
        assert callable(get_object(target))


def test_default_run_is_gpt_on_characters_of_tiny_shakespeare(tmp_path):
    cfg = compose_config([], tmp_path)
    assert (cfg.names.model, cfg.names.tokenizer, cfg.names.data) == ("gpt", "char", "tinyshakespeare")
    assert cfg.model.block_size == cfg.data.block_size


def test_unknown_choice_is_reported_without_a_traceback():
    result = subprocess.run(
        [sys.executable, "train.py", "model=resnet"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "Could not find 'model/resnet'" in result.stderr
    assert "Traceback" not in result.stderr
