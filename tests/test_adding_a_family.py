"""Adding a model family takes its module, its config YAML and one registry line (docs/adding-a-model.md).

Here all three live in this test: a bigram model, a YAML written to a config folder put on Hydra's
search path, and `register_family`. With nothing else edited it trains, is parameter-matched, sweeps
with a comparison report, and generates from its checkpoint.
"""

from __future__ import annotations

import csv
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import Tensor, nn

from lmlab.checkpoint.format import load_checkpoint
from lmlab.generate import generate_from_config
from lmlab.models import LanguageModel, family_names, register_family, unregister_family
from lmlab.run.sizing import TOLERANCE
from lmlab.run.train import train
from tests.helpers import CONF, REPO, compose_config, sweep_overrides, tiny_overrides


class Bigram(LanguageModel):
    """The next token's logits depend on the current token only: its embedding through `n_layer` tanh
    layers of width d_model to the output layer (the module a new family would add to lmlab.models)."""

    def __init__(self, vocab_size: int, d_model: int = 16, n_layer: int = 1) -> None:
        super().__init__()
        self.vocab_size, self.context_length, self.d_model, self.n_layer = vocab_size, None, d_model, n_layer
        self.wte = nn.Embedding(vocab_size, d_model)
        self.hidden = nn.Sequential(*(nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh()) for _ in range(n_layer)))
        self.lm_head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: Tensor, state: None = None) -> tuple[Tensor, None]:
        return self.lm_head(self.hidden(self.wte(idx))), None

    def init_state(self, batch_size: int, device: torch.device | str) -> None:
        return None


BIGRAM_YAML = f"""# A bigram model: the next token from the current one. Keys: d_model, n_layer.
defaults:
  - /schema/model/bigram@_here_
  - _self_
_target_: {__name__}.Bigram
"""
TARGET_PARAMS = 3000


@pytest.fixture
def bigram(tmp_path: Path):
    """The three pieces of a new family: the class above, its YAML (in a config folder on Hydra's search
    path, standing in for conf/model/) and its registry line; the override that finds the YAML."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "bigram.yaml").write_text(BIGRAM_YAML)
    register_family("bigram", Bigram, adamw_lr=3e-2, tiny={"d_model": 8})
    yield f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    unregister_family("bigram")


def test_a_family_registered_in_a_test_trains_matches_sizes_and_generates(bigram, small_corpus, tmp_path):
    assert family_names()[-1] == "bigram"  # after the built-in families in tables and plots
    overrides = [*tiny_overrides("bigram", small_corpus), bigram, f"budget.target_params={TARGET_PARAMS}"]
    cfg = compose_config(overrides, tmp_path / "run")
    assert cfg.task.optimizer.lr == 3e-2 and cfg.adamw_lr.bigram == 3e-2  # its registry line's rate
    metrics = train(cfg)
    assert abs(metrics["params"] / TARGET_PARAMS - 1) <= TOLERANCE  # parameter matching found its width
    assert metrics["status"] == "completed" and metrics["val/bpb"] < math.log2(metrics["params"])
    assert (tmp_path / "run" / "sample.txt").read_text().strip()

    loaded = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")  # the registry vouches for the class
    planned = OmegaConf.load(tmp_path / "run" / "config.yaml")  # the run's plan: the matched width
    assert type(loaded.model) is Bigram and loaded.model.d_model == planned.model.d_model != cfg.model.d_model
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        generate = compose(
            config_name="generate",
            overrides=[f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "max_new_tokens=30", "seed=3"],
        )
    (text,) = generate_from_config(generate)
    assert len(text) >= 10  # 30 characters, less any the tokenizer cannot show


def test_a_name_is_registered_once_and_only_for_a_language_model() -> None:
    with pytest.raises(ValueError, match="'gpt' is registered already"):
        register_family("gpt", Bigram, adamw_lr=1e-3, tiny={})
    with pytest.raises(TypeError, match="not a LanguageModel subclass"):
        register_family("linear", nn.Linear, adamw_lr=1e-3, tiny={})
    assert "linear" not in family_names()


def test_a_family_registered_in_a_test_sweeps_with_a_report(bigram, small_corpus, tmp_path, monkeypatch):
    sweep = tmp_path / "multirun"
    overrides = sweep_overrides(small_corpus, sweep, ["seed=1,2"], ("model=bigram", bigram))
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", *overrides])
    GlobalHydra.instance().clear()
    runpy.run_path(
        str(REPO / "train.py"), run_name="__main__"
    )  # the sweep, in this process, where bigram is registered
    with (sweep / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["run"] for row in rows) == ["seed=1", "seed=2"]
    assert all(row["model"] == "bigram" and row["status"] == "completed" for row in rows)
    assert "| bigram |" in (sweep / "comparison.md").read_text()
    assert (sweep / "bpb_by_model.png").read_bytes().startswith(b"\x89PNG")
