"""Shared fixtures: a small corpus and Hydra configs composed from the real conf/ tree, shrunk for CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import lmlab.config  # noqa: F401  (registers resolvers)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
MODELS = ["rnn", "gru", "lstm", "transformer", "gpt"]
TOKENIZERS = ["char", "word", "bpe"]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first 60 kB of Tiny Shakespeare: big enough for every tokenizer, small enough to train in seconds."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(SHAKESPEARE.read_text()[:60_000])
    return path


def tiny_overrides(model: str, corpus: Path, steps: int = 20) -> list[str]:
    """Command-line overrides that shrink any model x tokenizer run to a few seconds on CPU."""
    size = ["model.d_model=32", "model.n_layer=1"] + (["model.n_head=2"] if model in ("gpt", "transformer") else [])
    return [f"model={model}", "data=text", f"data.path={corpus}", "data.block_size=32", "data.batch_size=8",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps // 2}",
            "trainer.accelerator=cpu", "trainer.devices=1", "scheduler.warmup_steps=2", "sample.max_new_tokens=20", *size]


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """compose() the real config as `python train.py OVERRIDES` would, with the run writing to output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[o for o in overrides if o], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(output_dir.parent / "cache")
        del cfg["hydra"]
    return cfg
