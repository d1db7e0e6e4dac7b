"""Every bad input in docs/reliability.md ends in its one-line error before any training step.

Most cases run `train()` in-process (a fraction of a second each); a few go through `python
train.py` to check what the user sees: the exit code, one line, no traceback.
"""

from __future__ import annotations

import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException

from lmlab.checkpoint import load_checkpoint
from lmlab.errors import ConfigError, DataError
from lmlab.run.train import train
from lmlab.tokenizers import CharTokenizer
from tests.commands import run_command
from tests.helpers import REPO, compose_config, tiny_overrides
from tests.outcomes import check_outcome

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """One folder per bad corpus, named as the cases below use them."""
    root = tmp_path_factory.mktemp("corpora")
    (root / "binaries").mkdir()
    (root / "binaries" / "weights.bin").write_bytes(b"\x00\x01")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("  \n\n ")
    (root / "latin1.txt").write_bytes("hello caf\xe9 world".encode("latin-1"))
    (root / "tiny.txt").write_text("to be or not to be\n" * 3)
    return root


DATA_CASES = {
    "a data.path that does not exist": (["data.path={root}/no/such.txt"], DataError, "does not exist"),
    "a folder without text files": (["data.path={root}/binaries"], DataError, "holds no text files"),
    "an empty file": (["data.path={root}/empty.txt"], DataError, "is empty"),
    "a whitespace-only file": (["data.path={root}/blank.txt"], DataError, "is empty"),
    "a file that is not UTF-8": (["data.path={root}/latin1.txt"], DataError, "invalid byte 0xe9 at byte offset 9"),
    "a corpus smaller than one batch": (["data.path={root}/tiny.txt"], DataError, "fewer than one batch"),
    "a corpus smaller than one window": (
        ["data.path={root}/tiny.txt", "data.block_size=512"],
        DataError,
        "fewer than one training window",
    ),
    "a split that ends up empty": (["data.splits=[1.0,0.0,0.0]"], DataError, "the val split is empty"),
    "data.splits not summing to 1": (["data.splits=[0.5,0.2,0.2]"], DataError, "summing to 1"),
}

SETTING_CASES = {
    "zero layers": (["model.n_layer=0"], ConfigError, "n_layer must be >= 1"),
    "a negative width": (["model.d_model=-32"], ConfigError, "d_model must be >= 1"),
    "heads not dividing the width": (["model.n_head=3"], ConfigError, "divisible by n_head"),
    "a dropout of 1": (["model.dropout=1.0"], ConfigError, "dropout must be in [0, 1)"),
    "a zero batch": (["data.batch_size=0"], ConfigError, "data.batch_size must be >= 1"),
    "a zero window": (["data.block_size=0"], ConfigError, "data.block_size must be >= 1"),
    "a BPE vocabulary below its byte alphabet": (
        ["tokenizer=bpe", "tokenizer.vocab_size=100"],
        ConfigError,
        "smaller than the byte-level alphabet",
    ),
    "windows beyond the positional table": (
        ["model.block_size=16"],
        ConfigError,
        "data.block_size=32 is longer than the model's context",
    ),
    "zero steps": (["trainer.max_steps=0"], ConfigError, "trains nothing"),
    "negative steps": (["trainer.max_steps=-5"], ConfigError, "trains nothing"),
    "a negative learning rate": (["task.optimizer.lr=-0.1"], ConfigError, "Invalid learning rate"),
    "label smoothing above 1": (["task.label_smoothing=2"], ConfigError, "label_smoothing must be in [0, 1]"),
    "activation checkpointing without repeated blocks": (
        ["model=lstm", "perf.activation_checkpointing=true"],
        ConfigError,
        "perf.activation_checkpointing=true needs a model made of repeated blocks",
    ),
    "an unknown precision": (["trainer.precision=bogus"], ConfigError, "invalid trainer config: Precision 'bogus'"),
    "an accelerator without its library": (["trainer.accelerator=tpu"], ConfigError, "invalid trainer config"),
    "an end-of-run sample with top_k=0": (["sample.top_k=0"], ConfigError, "top_k must be >= 1"),
    "an end-of-run sample with a negative temperature": (
        ["sample.temperature=-1"],
        ConfigError,
        "temperature must be >= 0",
    ),
    "stateful data for an attention model": (
        ["data.stateful=true"],
        ConfigError,
        "data.stateful=true needs a recurrent model",
    ),
    "an LR monitor without a logger": (
        ["~logger"],
        ConfigError,
        "Lightning refused this setup: Cannot use `LearningRateMonitor`",
    ),
    "a negative seed": (["seed=-1"], ConfigError, "seed=-1 must be an integer from 0 to 4294967295"),
    "a negative max_time": (["trainer.max_time=-1"], ConfigError, "trainer.max_time=-1 is not a duration"),
    "a negative warmup": (
        ["task.scheduler.warmup_steps=-5"],
        ConfigError,
        "task.scheduler.warmup_steps=-5 must be a whole number >= 0",
    ),
}


def documented_input(case: str, args: list[str]) -> str:
    return f"{case}: `{' '.join(args).format(root='/x')}`"


@pytest.mark.parametrize("case", list(DATA_CASES) + list(SETTING_CASES))
def test_bad_input_raises_its_one_line_error_before_training(tmp_path, small_corpus, corpora, case):
    args, error, message = {**DATA_CASES, **SETTING_CASES}[case]
    run = tmp_path / "run"
    model = next((a.split("=", 1)[1] for a in args if a.startswith("model=")), "gpt")
    cfg = compose_config(tiny_overrides(model, small_corpus) + [a.format(root=corpora) for a in args], run)
    with pytest.raises(error) as raised:
        train(cfg)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()
    check_outcome(documented_input(case, args), str(raised.value).replace(str(corpora), "/x"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["model=resnet"], "Could not find 'model/resnet'"),
        (["tokenizer=sentencepiece"], "Could not find 'tokenizer/sentencepiece'"),
        (["optimizer=adafactor"], "Could not find 'optimizer/adafactor'"),
        (["model.n_layr=2"], "Could not override 'model.n_layr'"),
    ],
)
def test_unknown_choices_and_keys_fail_when_the_config_is_composed(tmp_path, args, message):
    with pytest.raises(HydraException, match=message):
        compose_config(args, tmp_path / "run")


def test_hydra_errors_reach_the_user_without_a_traceback(tmp_path):
    for args, message in (
        (["model=resnet"], "Could not find 'model/resnet'"),
        (["model.n_layr=2"], "Key 'n_layr' not in 'GPTConfig'"),
    ):
        result = run_command(
            [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'run'}"],
            cwd=REPO,
            timeout=300,
        )
        assert result.returncode != 0
        assert message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists()
        first = result.stderr.strip().splitlines()[0]
        check_outcome(f"an unknown choice or key: `{args[0]}`", f"{first} (Hydra; exit code 1)")


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory, small_corpus) -> Path:
    """A real checkpoint of a 4-step run, and damaged copies of it named as the cases below use them."""
    root = tmp_path_factory.mktemp("checkpoints")
    train(compose_config(tiny_overrides("gpt", small_corpus, steps=4), root / "run"))
    good = root / "run" / "checkpoints" / "last.ckpt"
    raw = good.read_bytes()
    (root / "truncated.ckpt").write_bytes(raw[: len(raw) // 2])
    (root / "text.ckpt").write_text("not a checkpoint")
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    torch.save({**checkpoint, "lmlab": {**checkpoint["lmlab"], "format_version": 99}}, root / "future.ckpt")
    other = CharTokenizer()
    other.train("a different corpus, with fewer symbols")
    torch.save(
        {**checkpoint, "lmlab": {**checkpoint["lmlab"], "tokenizer": other.to_json()}}, root / "other_tokenizer.ckpt"
    )
    torch.save({key: value for key, value in checkpoint.items() if key != "lmlab"}, root / "lightning_only.ckpt")
    torch.save({**checkpoint, "code": Fraction(1, 3)}, root / "pickled_object.ckpt")
    return root


BAD_CHECKPOINTS = {
    "missing.ckpt": ("a checkpoint that does not exist", "does not exist"),
    "truncated.ckpt": ("a truncated checkpoint", "it is truncated or not a PyTorch checkpoint"),
    "text.ckpt": ("a text file given as a checkpoint", "it is truncated or not a PyTorch checkpoint"),
    "future.ckpt": ("a checkpoint of another lmlab format version", "has lmlab format version 99"),
    "other_tokenizer.ckpt": ("a checkpoint whose tokenizer is not its model's", "pairs a model trained on"),
    "lightning_only.ckpt": ("a checkpoint not written by lmlab", "has no 'lmlab' section"),
    "pickled_object.ckpt": ("a checkpoint holding a pickled Python object", "lmlab only reads plain data"),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_refused_in_one_line(tmp_path, bad_checkpoints, name):
    case, message = BAD_CHECKPOINTS[name]
    for key in ("ckpt_path", "init_from"):
        with pytest.raises(ConfigError) as raised:
            train(compose_config([f"{key}={bad_checkpoints / name}"], tmp_path / "run"))
        assert message in str(raised.value) and "\n" not in str(raised.value)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_checkpoint(bad_checkpoints / name)
    assert not (tmp_path / "run").exists()
    check_outcome(f"{case} (`ckpt_path=`, `init_from=`, generate.py, evaluate.py)", str(raised.value))
