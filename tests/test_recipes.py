"""The published-number recipes (conf/experiment/ptb_lstm_medium*, shakespeare_char) compose as their papers
say, run a few steps on CPU when shrunk, and score PTB in per-word perplexity."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lmlab.checkpoint import load_checkpoint
from lmlab.run.train import train
from lmlab.tokenizers import load_tokenizer
from tests.commands import run_command
from tests.helpers import REPO, compose_config

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "that",
    "is",
    "was",
    "he",
    "for",
    "it",
    "with",
    "as",
    "his",
    "on",
    "be",
    "at",
    "by",
    "i",
    "<unk>",
    "n't",
    "'s",
    "N",
]
PTB_FILES = {"train": "ptb.train.txt", "val": "ptb.valid.txt", "test": "ptb.test.txt"}


def write_ptb_like(folder: Path, lines: dict[str, int] | None = None) -> dict[str, list[str]]:
    """Penn-Treebank-shaped split files (space-separated words, a leading space, `<unk>` as a word, one
    sentence per line), every val/test word also in train; returns each split's lines."""
    lines = lines or {"train": 40, "val": 8, "test": 8}
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for offset, (split, count) in enumerate(lines.items()):
        rows = [
            " ".join(WORDS[(7 * i + 3 * j + offset) % len(WORDS)] for j in range(3 + (i * 5 + offset) % 9))
            for i in range(count)
        ]
        (folder / PTB_FILES[split]).write_text("".join(f" {row} \n" for row in rows))
        written[split] = rows
    return written


def tiny_ptb_overrides(recipe: str, folder: Path, *extra: str) -> list[str]:
    """A PTB recipe shrunk to seconds on CPU: the same groups and schedule, a tiny LSTM on tiny files."""
    return [
        f"experiment={recipe}",
        f"data.path={folder}",
        "data.block_size=6",
        "data.batch_size=4",
        "model.d_model=16",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "sample.max_new_tokens=5",
        *extra,
    ]


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        (
            "ptb_lstm_medium",
            {
                "data.block_size": 35,
                "data.batch_size": 20,
                "data.eval_batch_size": 1,
                "data.stateful": True,
                "model.d_model": 650,
                "model.n_layer": 2,
                "model.dropout": 0.5,
                "model.init_range": 0.05,
                "model.tie_weights": False,
                "task.optimizer._target_": "torch.optim.SGD",
                "task.optimizer.lr": 35.0,
                "task.optimizer.momentum": 0.0,
                "task.scheduler._target_": "lmlab.optim.step_decay",
                "task.scheduler.start_epoch": 7,  # the Torch code's first decayed epoch is the 8th
                "trainer.max_epochs": 39,
                "trainer.precision": "32-true",
                "float32_matmul_precision": "highest",
                "trainer.accelerator": "gpu",
                "tokenizer.eos_per_line": True,
                "tokenizer.unk": True,
            },
        ),
        (
            "ptb_lstm_medium_tied",
            {
                "data.eval_batch_size": 10,
                "model.tie_weights": True,
                "model.init_range": None,
                "task.optimizer.lr": 20.0,
                "task.scheduler._target_": "lmlab.optim.plateau",
                "task.scheduler.factor": 0.25,
                "trainer.max_epochs": 40,
                "trainer.gradient_clip_val": 0.25,
            },
        ),
        (
            "shakespeare_char",
            {
                "model._target_": "lmlab.models.GPT",
                "model.d_model": 384,
                "model.n_layer": 6,
                "model.n_head": 6,
                "model.dropout": 0.2,
                "data.block_size": 256,
                "data.batch_size": 64,
                "data.sampling": "random",
                "perf.compile": True,
                "task.optimizer.lr": 1e-3,
                "task.optimizer.betas": [0.9, 0.99],
                "task.optimizer.weight_decay": 0.1,
                "task.scheduler.warmup_steps": 100,
                "task.scheduler.min_lr_ratio": 0.1,
                "trainer.max_steps": 5000,
                "trainer.val_check_interval": 250,
                "trainer.gradient_clip_val": 1.0,
                "trainer.precision": "bf16-mixed",
            },
        ),
    ],
)
def test_each_recipe_composes_its_papers_settings(tmp_path, recipe, expected):
    from omegaconf import OmegaConf

    cfg = compose_config([f"experiment={recipe}"], tmp_path)
    got = {key: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}))["v"] for key in expected}
    assert got == expected


def test_zaremba_lr_and_clip_are_the_papers_on_a_summed_loss(tmp_path):
    """The paper sums the loss over its 35 steps: lr x 35 and clip / 35 give its updates on lmlab's mean loss."""
    cfg = compose_config(["experiment=ptb_lstm_medium"], tmp_path)
    steps = cfg.data.block_size
    assert cfg.task.optimizer.lr / steps == pytest.approx(1.0)
    assert cfg.trainer.gradient_clip_val * steps == pytest.approx(5.0)
    assert cfg.task.scheduler.factor == pytest.approx(1 / 1.2)


class RecordTraining(pl.Callback):
    """Test-only: the model as training starts and every batch it trains on (kept on the class: Hydra
    builds the instance inside train())."""

    initial: torch.nn.Module | None = None
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        RecordTraining.initial, RecordTraining.batches = copy.deepcopy(pl_module.model), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        RecordTraining.batches.append((batch[0].clone(), batch[1].clone()))


def test_the_zaremba_recipe_makes_the_papers_updates(tmp_path):
    """Three epochs of the shrunk recipe (dropout off, decay from the second epoch) against Zaremba's
    update written out by hand: the same streams (20 contiguous columns in the paper, here 4), state
    zeroed at each epoch and carried between windows, the loss summed over time steps and averaged
    over the batch, the gradient norm clipped at 5, plain SGD at lr 1 divided by 1.2 per epoch."""
    write_ptb_like(tmp_path / "ptb", {"train": 200, "val": 8, "test": 8})
    extra = ["data.block_size=35", "model.dropout=0", "trainer.max_epochs=3", "task.scheduler.start_epoch=1"]
    extra += [f"+callbacks.zz_record._target_={__name__}.RecordTraining"]
    train(compose_config(tiny_ptb_overrides("ptb_lstm_medium", tmp_path / "ptb", *extra), tmp_path / "run"))

    tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    ids = torch.as_tensor(tokenizer.encode((tmp_path / "ptb" / PTB_FILES["train"]).read_text()), dtype=torch.long)
    streams, steps = 4, 35  # data.batch_size, data.block_size: the paper's 35 steps
    # Contiguous columns as main.lua's replicate() cuts them, each as long as the windows it feeds
    # (main.lua's columns run a few tokens further, into a tail no window reads)
    row = (len(ids) - 1) // streams // steps * steps
    x = torch.stack([ids[r * row : (r + 1) * row] for r in range(streams)])
    y = torch.stack([ids[r * row + 1 : (r + 1) * row + 1] for r in range(streams)])
    windows = [(x[:, i : i + steps], y[:, i : i + steps]) for i in range(0, row, steps)]
    assert len(RecordTraining.batches) == 3 * len(windows)
    for (x, y), (want_x, want_y) in zip(RecordTraining.batches, windows * 3, strict=True):
        assert torch.equal(x, want_x) and torch.equal(y, want_y)

    model = RecordTraining.initial
    for epoch in range(3):
        lr, state = 1.0 / 1.2**epoch, None
        for x, y in windows:
            logits, state = model(x, state)
            nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # [batch, time]
            model.zero_grad()
            nats.mean(0).sum().backward()
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            shrink = min(1.0, 5.0 / float(norm))  # main.lua: paramdx:mul(max_grad_norm / norm_dw) above 5
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * shrink * p.grad
            state = tuple(s.detach() for s in state)
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # Lightning's clipping divides by the norm + 1e-6, on a gradient 35 times smaller: relative 1e-4 apart
    for name, want in model.state_dict().items():
        torch.testing.assert_close(trained[f"model.{name}"], want, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ptb_lstm_medium", "ptb_lstm_medium_tied"])
def test_the_ptb_recipes_train_two_epochs_on_cpu(tmp_path, recipe):
    write_ptb_like(tmp_path / "ptb")
    metrics = train(compose_config(tiny_ptb_overrides(recipe, tmp_path / "ptb"), tmp_path / "run"))
    assert metrics["status"] == "completed" and metrics["data"] == "ptb"
    assert metrics["steps"] == 2 * 13 and math.isfinite(metrics["test/ppl"])  # 316 tokens: 4 streams of 13 windows


def test_ptb_test_perplexity_is_per_word_with_one_eos_per_line(tmp_path):
    """test/ppl = exp(total nats / (words + lines)), the nats computed here by running the scored
    model over the test text as one stream (data.eval_batch_size=1, the paper's test layout)."""
    rows = write_ptb_like(tmp_path / "ptb")
    # one validation, at the last step: the scored checkpoint is the final weights
    run = tmp_path / "run"
    extra = ("trainer.max_epochs=1",)
    metrics = train(compose_config(tiny_ptb_overrides("ptb_lstm_medium", tmp_path / "ptb", *extra), run))
    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    tokenizer, model = loaded.tokenizer, loaded.model.eval()
    test_ids = tokenizer.encode("".join(f" {row} \n" for row in rows["test"]))
    words, lines = sum(len(row.split()) for row in rows["test"]), len(rows["test"])
    assert len(test_ids) == words + lines  # every word a token, plus <eos> per line
    context = tokenizer.encode("".join(f" {row} \n" for row in rows["val"]))[-1]  # <eos>: the previous split's last
    stream = torch.tensor([[int(context), *test_ids.tolist()]], dtype=torch.long)
    with torch.no_grad():
        logits, _ = model(stream[:, :-1])
    nats = torch.nn.functional.cross_entropy(logits[0].double(), stream[0, 1:], reduction="sum").item()
    assert metrics["test/ppl"] == pytest.approx(math.exp(nats / (words + lines)), rel=1e-5)
    assert metrics["test/loss"] == pytest.approx(nats / (words + lines), rel=1e-5)


@pytest.mark.slow
def test_shakespeare_char_runs_a_few_steps_on_cpu(tmp_path, small_corpus):
    tiny = [
        "experiment=shakespeare_char",
        "data=text",
        f"data.path={small_corpus}",
        "model.d_model=32",
        "model.n_layer=1",
        "model.n_head=2",
        "data.block_size=32",
        "data.batch_size=8",
        "perf.compile=false",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "task.scheduler.warmup_steps=2",
        "sample.max_new_tokens=5",
    ]
    metrics = train(compose_config(tiny, tmp_path / "run"))
    assert metrics["status"] == "completed" and metrics["steps"] == 6 and math.isfinite(metrics["val/loss"])


@pytest.mark.slow
def test_bench_recipes_tiny_writes_its_result_and_curve(tmp_path):
    result = run_command(
        [sys.executable, "bench/recipes.py", "shakespeare_char", "--tiny", "--run-dir", str(tmp_path / "run")],
        cwd=REPO,
        timeout=600,
        env={**os.environ, "LMLAB_RESULTS_DIR": str(tmp_path / "results")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "results" / "recipe_shakespeare_char_tiny.json").read_text())
    assert payload["recipe"] == "shakespeare_char" and payload["tiny"] is True and payload["meets_target"] is None
    assert payload["published"]["val/loss"] == 1.4686 and math.isfinite(payload["measured"]["val/loss"])
    assert [point["step"] for point in payload["curve"]] == [10, 20, 30] and payload["wall_time_s"] > 0
    assert (tmp_path / "results" / "recipe_shakespeare_char_tiny.png").stat().st_size > 1000
