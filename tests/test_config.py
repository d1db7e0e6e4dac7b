"""Every option of every config group composes, and bad choices fail with Hydra's own message."""

from __future__ import annotations

import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from lmlab.generate import SamplingConfig
from lmlab.task import LanguageModelTask
from tests.commands import run_command
from tests.helpers import CONF, REPO, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
RECIPES = {"experiment", "hparams_search"}  # `# @package _global_` recipes, composed in tests/test_sweep.py
SETTINGS = {
    "budget",
    "sample",
    "sweep",
}  # plain settings read by the run (lmlab.run.budgets, lmlab.generate.SamplingConfig) and the sweeper
PACKAGES = {"optimizer": "task.optimizer", "scheduler": "task.scheduler"}  # where a group's choice lands
OPTIONS = [
    (group, option.stem)
    for group in GROUPS
    if group not in RECIPES | SETTINGS
    for option in sorted((CONF / group).glob("*.yaml"))
]


def test_the_groups_the_product_promises_exist():
    assert {"data", "tokenizer", "model", "optimizer", "scheduler", "trainer", "logger", "callbacks"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_names_a_real_class(tmp_path, group, option):
    overrides = [f"{group}={option}"] + (
        ["data.path=some.txt"] if (group, option) in {("data", "text"), ("data", "hf")} else []
    )
    cfg = compose_config(overrides, tmp_path)
    node = OmegaConf.select(cfg, PACKAGES.get(group, group))
    targets = [node["_target_"]] if "_target_" in node else [v["_target_"] for v in node.values() if "_target_" in v]
    assert targets, f"{group}={option} names no _target_"
    for target in targets:
        assert callable(get_object(target))


def test_the_task_node_builds_the_module_with_its_optimizer_and_schedule(tmp_path):
    cfg = compose_config(["optimizer=sgd", "scheduler=linear"], tmp_path)
    task = instantiate(cfg.task, model=torch.nn.Linear(2, 2))
    assert isinstance(task, LanguageModelTask)
    assert task.optimizer_factory.func is torch.optim.SGD and task.weight_decay == cfg.task.optimizer.weight_decay
    assert task.scheduler_factory.func.__name__ == "warmup_linear"


def test_one_sampling_node_serves_training_samples_and_generate(tmp_path):
    cfg = compose_config(["sample.temperature=0.5"], tmp_path)
    assert SamplingConfig.from_config(cfg.sample).temperature == 0.5
    assert cfg.callbacks.validation_sample.sample.temperature == 0.5  # the validation samples read the same node
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        generate = compose(config_name="generate", overrides=["ckpt=x.ckpt", "top_p=0.9"])
    assert SamplingConfig.from_config(generate) == SamplingConfig.from_config(cfg.sample, temperature=0.8, top_p=0.9)


def test_default_run_is_gpt_on_characters_of_tiny_shakespeare(tmp_path):
    cfg = compose_config([], tmp_path)
    assert (cfg.names.model, cfg.names.tokenizer, cfg.names.data) == ("gpt", "char", "tinyshakespeare")
    assert cfg.model.block_size == cfg.data.block_size


def test_each_model_family_gets_its_own_adamw_rate_unless_one_is_given(tmp_path):
    table = OmegaConf.load(CONF / "train.yaml").adamw_lr
    models = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
    assert sorted(table) == models  # every family has a rate, and the table names no other
    for model in models:
        assert compose_config([f"model={model}"], tmp_path).task.optimizer.lr == table[model]
    assert table.lstm > table.gpt  # recurrent cells want a higher rate (measured, docs/comparisons.md)
    assert compose_config(["model=lstm", "task.optimizer.lr=1e-3"], tmp_path).task.optimizer.lr == 1e-3
    assert compose_config(["model=lstm", "optimizer=sgd"], tmp_path).task.optimizer.lr == 1.0  # AdamW's only


def test_unknown_choice_is_reported_without_a_traceback():
    result = run_command([sys.executable, "train.py", "model=resnet"], cwd=REPO, timeout=120)
    assert result.returncode != 0
    assert "Could not find 'model/resnet'" in result.stderr
    assert "Traceback" not in result.stderr
