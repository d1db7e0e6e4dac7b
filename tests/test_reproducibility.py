"""seed=S repeats a CPU run bit for bit, and every run records what it needs to be repeated."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.run.info import git_state
from lmlab.run.train import train
from tests.helpers import REPO, compose_config, tiny_overrides

pytestmark = pytest.mark.reliability


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    """Every (step, train/loss) TensorBoard holds for the run."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("train/loss")]


def run(tmp_path: Path, corpus: Path, name: str, seed: int) -> tuple[dict, Path]:
    overrides = tiny_overrides("gpt", corpus, steps=12) + [
        f"seed={seed}",
        "trainer.log_every_n_steps=1",
        "model.dropout=0.1",
    ]
    run_dir = tmp_path / name
    return train(compose_config(overrides, run_dir)), run_dir


def test_same_seed_repeats_every_loss_and_a_new_seed_does_not(tmp_path, small_corpus):
    first, first_dir = run(tmp_path, small_corpus, "a", seed=3)
    second, second_dir = run(tmp_path, small_corpus, "b", seed=3)
    other, other_dir = run(tmp_path, small_corpus, "c", seed=4)

    losses = logged_losses(first_dir)
    assert len(losses) == 12
    assert logged_losses(second_dir) == losses  # bit for bit: floats compared exactly
    assert logged_losses(other_dir) != losses
    timings = ("wall_time_s", "cpu_time_s")
    timeless = {key: value for key, value in first.items() if key not in timings}
    assert {key: value for key, value in second.items() if key not in timings} == timeless
    assert other["val/loss"] != first["val/loss"]


def test_run_info_records_seed_versions_commit_and_corpus(tmp_path, small_corpus):
    _, run_dir = run(tmp_path, small_corpus, "run", seed=11)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["seed"] == 11
    assert len(info["corpus_sha256"]) == 64
    assert {"torch", "pytorch-lightning", "hydra-core", "tokenizers", "lmlab", "python"} <= info["versions"].keys()
    assert all(info["versions"][name] for name in ("torch", "pytorch-lightning", "lmlab"))
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert info["git"]["commit"] == head and isinstance(info["git"]["dirty"], bool)

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    assert "run_info/text_summary" in events.Tags()["tensors"]
    shown = events.Tensors("run_info/text_summary")[0].tensor_proto.string_val[0].decode()
    assert info["corpus_sha256"] in shown and '"seed": 11' in shown


def test_git_state_is_none_outside_a_checkout(tmp_path):
    assert git_state(tmp_path) is None
