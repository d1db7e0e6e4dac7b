"""evaluate.py scores any text as training scores its validation split."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lmlab.checkpoint import load_checkpoint
from lmlab.data.corpus import split_by_bytes
from lmlab.errors import ConfigError
from lmlab.models import GPT, RecurrentLM
from lmlab.run.evaluate import evaluate_from_config, score_text
from lmlab.tokenizers import WordTokenizer
from tests.commands import run_command
from tests.helpers import REPO


@pytest.fixture(scope="module")
def run_splits(trained_run, small_corpus) -> dict[str, str]:
    return split_by_bytes(small_corpus.read_text(), [0.9, 0.05, 0.05])


def test_scoring_the_validation_text_reproduces_the_runs_val_bpb(trained_run, run_splits):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    best = load_checkpoint(next((trained_run / "checkpoints").glob("best-step*.ckpt")))
    # the run predicted the split's first token from the last training token: give the same context
    context = int(best.tokenizer.encode(run_splits["train"])[-1])
    scores = score_text(
        best.model, best.tokenizer, run_splits["val"], block_size=32, batch_size=8, context_token=context
    )
    assert scores.bpb == pytest.approx(metrics["val/bpb"], rel=1e-5)
    assert scores.loss == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert scores.bytes == len(run_splits["val"].encode()) and scores.unk_rate == 0.0


def test_evaluate_py_prints_and_writes_the_scores_of_a_whole_file(trained_run, run_splits, tmp_path):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    text = tmp_path / "val.txt"
    text.write_text(run_splits["val"])
    best = next((trained_run / "checkpoints").glob("best-step*.ckpt"))
    result = run_command(
        [sys.executable, "evaluate.py", f"ckpt={best}", f"data.path={text}"],
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bits per byte" in result.stdout
    scores = json.loads((trained_run / "eval-val.json").read_text())  # default: beside the run's metrics.json
    # only the first token's context differs from the run's validation (a newline, not the last training token)
    assert scores["bpb"] == pytest.approx(metrics["val/bpb"], rel=1e-2)
    assert scores["ppl"] == pytest.approx(math.exp(scores["loss"]))
    assert scores["tokens"] == len(run_splits["val"]) and scores["step"] == metrics["best_step"]


def test_word_level_scores_report_the_unknown_rate(tmp_path):
    tokenizer = WordTokenizer(min_frequency=1, unk=True)
    tokenizer.train("the cat sat on the mat\n" * 10)
    model = GPT(tokenizer.vocab_size, d_model=16, n_layer=1, n_head=2, block_size=8).eval()
    scores = score_text(model, tokenizer, "the dog sat on the rug\n", block_size=8, batch_size=2)
    assert scores.tokens == 7 and scores.unk_rate == pytest.approx(2 / 7)


def test_stateful_scoring_carries_the_state_across_windows():
    tokenizer = WordTokenizer(min_frequency=1)
    text = "the cat sat on the mat\n" * 30
    tokenizer.train(text)
    torch.manual_seed(0)
    model = RecurrentLM(tokenizer.vocab_size, cell="gru", d_model=16, n_layer=1, dropout=0.0).eval()
    one_stream = score_text(model, tokenizer, text, block_size=5, batch_size=1, stateful=True)
    whole = score_text(model, tokenizer, text, block_size=len(tokenizer.encode(text)), batch_size=1)
    assert one_stream.loss == pytest.approx(whole.loss, rel=1e-5)  # carried state = one long window


def test_evaluate_refuses_what_it_cannot_score(trained_run, tmp_path):
    best = next((trained_run / "checkpoints").glob("best-step*.ckpt"))
    (tmp_path / "text.txt").write_text("First Citizen:\n")
    for overrides, message in (
        (["data.block_size=64"], "longer than the model's context (32)"),
        ([f"ckpt={tmp_path / 'no.ckpt'}"], "does not exist"),
    ):
        cfg = OmegaConf.merge(
            OmegaConf.load(REPO / "conf" / "evaluate.yaml"),
            OmegaConf.from_dotlist([f"ckpt={best}", f"data.path={tmp_path / 'text.txt'}", *overrides]),
        )
        with pytest.raises(ConfigError, match=re.escape(message)):
            evaluate_from_config(cfg)
