"""Shared fixtures: a small corpus, a tiny sweep and a trained run (helpers live in tests/helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.commands import run_command
from tests.helpers import REPO, SHAKESPEARE, SWEEP_BYTES, SWEEP_PARAMS, compose_config, sweep_overrides, tiny_overrides


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first 60 kB of Tiny Shakespeare: big enough for every tokenizer, small enough to train in seconds."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(SHAKESPEARE.read_text()[:60_000])
    return path


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, small_corpus) -> Path:
    """model=gpt,lstm x tokenizer=char,bpe, parameter-matched on equal bytes: the sweep and notebook tests share it."""
    sweep = tmp_path_factory.mktemp("tiny_sweep") / "multirun"
    overrides = sweep_overrides(
        small_corpus,
        sweep,
        ["model=gpt,lstm", "tokenizer=char,bpe"],
        (f"budget.max_bytes={SWEEP_BYTES}", f"budget.target_params={SWEEP_PARAMS}"),
    )
    result = run_command([sys.executable, "train.py", "-m", *overrides], cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_corpus) -> Path:
    """The run directory of a tiny GPT trained 20 steps on characters: the checkpoint, generation and
    evaluation tests share its checkpoints. In fp32 whatever the CPU, so that evaluate.py (fp32)
    reproduces its validation score exactly."""
    from lmlab.run.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(compose_config([*tiny_overrides("gpt", small_corpus), "trainer.precision=32-true"], run))
    return run
