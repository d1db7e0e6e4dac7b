"""train.py end to end: every model x tokenizer on a tiny budget, the run directory, clear errors."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from lmlab.run.train import train
from tests.commands import run_command
from tests.helpers import MODELS, REPO, TOKENIZERS, compose_config, tiny_overrides

METRIC_KEYS = {
    "val/loss",
    "val/ppl",
    "val/bpb",
    "test/loss",
    "test/ppl",
    "test/bpb",
    "params",
    "tokens_seen",
    "wall_time_s",
    "model",
    "tokenizer",
    "data",
}


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_with_every_tokenizer(tmp_path, small_corpus, model, tokenizer):
    cfg = compose_config(tiny_overrides(model, small_corpus) + [f"tokenizer={tokenizer}"], tmp_path / "run")
    metrics = train(cfg)
    assert metrics.keys() >= METRIC_KEYS
    assert (metrics["model"], metrics["tokenizer"]) == (model, tokenizer)
    assert metrics["tokens_seen"] == 20 * 8 * 32
    # 20 steps already beat a uniform guess over the vocabulary
    assert metrics["val/loss"] < math.log(metrics["vocab_size"])
    assert math.isclose(metrics["val/ppl"], math.exp(metrics["val/loss"]), rel_tol=1e-4)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test/bpb"] == metrics["test/bpb"]


def test_the_last_step_is_validated_and_saved_when_the_interval_does_not_divide_it(tmp_path, small_corpus):
    overrides = tiny_overrides("gpt", small_corpus, steps=13) + ["trainer.val_check_interval=5"]
    metrics = train(compose_config(overrides, tmp_path / "run"))
    curve = (tmp_path / "run" / "curve.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curve[1:]] == ["5", "10", "13"]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == metrics["steps"] == 13


@pytest.mark.slow
def test_a_run_that_never_logs_per_step_trains(tmp_path, small_corpus):
    """trainer.log_every_n_steps=0 (what Trainer(barebones=True) sets) means no per-step logging, not a crash."""
    metrics = train(
        compose_config(tiny_overrides("gpt", small_corpus, steps=4) + ["trainer.log_every_n_steps=0"], tmp_path)
    )
    assert metrics["status"] == "completed" and math.isfinite(metrics["val/bpb"])


def test_stateful_lstm_carries_state_and_learns(tmp_path, small_corpus):
    cfg = compose_config(tiny_overrides("lstm", small_corpus, steps=40) + ["data.stateful=true"], tmp_path / "run")
    metrics = train(cfg)
    assert metrics["val/loss"] < math.log(metrics["vocab_size"])


@pytest.mark.slow
def test_command_line_run_writes_a_complete_run_directory(tmp_path, small_corpus):
    overrides = tiny_overrides("gpt", small_corpus) + [
        "tokenizer=bpe",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "seed=7",
    ]
    result = run_command([sys.executable, "train.py", *overrides], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "run"
    for name in ("config.yaml", "tokenizer.json", "sample.txt", "metrics.json", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("best-step*.ckpt"))
    assert list(run.glob("events.out.tfevents.*"))
    assert "seed: 7" in (run / "config.yaml").read_text()
    assert "bits per byte" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["data=text", "data.path=/no/such/corpus.txt"], "does not exist"),
        (["model.n_layer=0"], "n_layer must be >= 1"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        (["tokenizer=bpe", "tokenizer.vocab_size=100"], "smaller than the byte-level alphabet"),
    ],
)
def test_bad_input_ends_with_one_line_error(tmp_path, args, message):
    result = run_command(
        [
            sys.executable,
            "train.py",
            *args,
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
