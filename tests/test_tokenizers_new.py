"""The unigram, bytes and pretrained tokenizers: exact round trips, JSON checkpoints, refusals, training runs."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers

from lmlab.data.cache import tokenize_with_cache
from lmlab.errors import ConfigError
from lmlab.report import write_report
from lmlab.run.train import train
from lmlab.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    PretrainedTokenizer,
    Tokenizer,
    UnigramTokenizer,
    load_tokenizer,
)
from lmlab.tokenizers.base import CHUNK_CHARS
from tests.commands import run_command
from tests.helpers import REPO, SHAKESPEARE, compose_config, tiny_overrides
from tests.test_fit import fake_run

TRAIN = SHAKESPEARE.read_text()[:100_000]
# Emoji (a ZWJ family, a skin tone, a flag), CJK, combining marks, control characters, odd spacing,
# a special token written out, SentencePiece's space mark and lmlab's byte-fallback look-alike.
TRICKY = (
    "Family 👨‍👩‍👧‍👦, thumbs 👍🏽, flag 🇯🇵. 日本語のテキストと中文，한국어.\n"
    "Combining: e\u0301 vs é; controls: \x00\x01\x07\x1b\x7f; line sep\u2028para\u2029; BOM \ufeff.\r\n"
    "\t  two spaces, trailing space \n\n<|endoftext|> ▁mark <0x41> \\x00 end"
)


def gpt2_style_file(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json, as GPT-2's is, made here (the tests never download)."""
    bpe = BPETokenizer(400)
    bpe.train(TRAIN)
    path = folder / "tokenizer.json"
    bpe.hf_tokenizer().save(str(path))
    return path


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory) -> Path:
    return gpt2_style_file(tmp_path_factory.mktemp("gpt2"))


FACTORIES = {
    "unigram": lambda _: UnigramTokenizer(400),
    "bytes": lambda _: ByteTokenizer(),
    "pretrained": lambda file: PretrainedTokenizer(str(file)),
}


@pytest.fixture(params=list(FACTORIES))
def tokenizer(request, pretrained_file) -> Tokenizer:
    made = FACTORIES[request.param](pretrained_file)
    if not made.is_trained:
        made.train(TRAIN)
    return made


def test_each_round_trips_emoji_cjk_and_control_characters_exactly(tokenizer):
    for text in (TRICKY, TRICKY * (2 * CHUNK_CHARS // len(TRICKY))):  # one chunk, and several
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < tokenizer.vocab_size
        assert tokenizer.decode(ids) == text
    assert tokenizer.unk_id is None and tokenizer.count_unknown(TRICKY) == 0 and tokenizer.unknown_symbols(TRICKY) == []


def test_each_saves_as_json_and_reloads_exactly(tokenizer, tmp_path):
    document = json.loads(tokenizer.to_json())
    assert document["config"]["name"] == tokenizer.name
    assert "path" not in document["config"]  # nothing in a checkpoint is a path to read again
    tokenizer.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert type(again) is type(tokenizer) and again.vocab_size == tokenizer.vocab_size
    assert np.array_equal(again.encode(TRICKY), tokenizer.encode(TRICKY))


def test_each_exports_a_hugging_face_tokenizer_with_the_same_ids(tokenizer):
    hf = tokenizer.hf_tokenizer()
    assert hf.encode(TRICKY, add_special_tokens=False).ids == tokenizer.encode(TRICKY).tolist()


def test_bits_per_byte_still_divide_by_the_raw_utf8_bytes(tokenizer, tmp_path):
    parts = {"train": TRAIN, "val": TRICKY, "test": SHAKESPEARE.read_text()[200_000:210_000] + TRICKY}
    corpus = tokenize_with_cache("tricky", parts, None, tokenizer, tmp_path)
    assert corpus.split_bytes == {name: len(text.encode("utf-8")) for name, text in parts.items()}
    assert tokenizer.decode(corpus.ids["test"]) == parts["test"]


def test_bytes_are_their_own_ids_and_nothing_is_learnt():
    tokenizer = ByteTokenizer()
    assert tokenizer.is_trained and tokenizer.vocab_size == 256
    assert tokenizer.encode("é😀").tolist() == list("é😀".encode())
    tokenizer.train("anything")  # a no-op: the vocabulary is every text's
    assert tokenizer.encode("a").tolist() == [97]
    assert tokenizer.decode(list("😀".encode())[:2]) == "\ufffd"  # a cut character shows as U+FFFD


def test_unigram_learns_up_to_vocab_size_and_refuses_too_small_a_vocabulary():
    sizes = {}
    for vocab_size in (300, 1000):
        tokenizer = UnigramTokenizer(vocab_size)
        tokenizer.train(TRAIN)
        sizes[vocab_size] = (tokenizer.vocab_size, len(tokenizer.encode(TRAIN)))
    assert 257 <= sizes[300][0] <= 300 and sizes[300][0] < sizes[1000][0] <= 1000
    assert sizes[1000][1] < sizes[300][1]  # a larger vocabulary: fewer tokens for the same text
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size=100 .* 257 or more"):
        UnigramTokenizer(100)


def test_pretrained_reads_a_folder_or_the_hugging_face_cache_and_never_retrains(pretrained_file, tmp_path, monkeypatch):
    from_folder = PretrainedTokenizer(str(pretrained_file.parent))
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_text(pretrained_file.read_text())
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_cache = PretrainedTokenizer("acme/tiny")
    assert np.array_equal(from_cache.encode(TRICKY), from_folder.encode(TRICKY))
    assert from_cache.vocab_size == HFTokenizer.from_file(str(pretrained_file)).get_vocab_size()
    with pytest.raises(ConfigError, match="never trained, it needs tokenizer.path"):
        PretrainedTokenizer().train(TRAIN)


def test_a_pretrained_checkpoint_needs_no_file(pretrained_file, tmp_path):
    copy = tmp_path / "tokenizer.json"
    copy.write_text(pretrained_file.read_text())
    saved = PretrainedTokenizer(str(copy)).to_json()
    copy.unlink()
    assert load_tokenizer(saved).decode(load_tokenizer(saved).encode(TRICKY)) == TRICKY


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda folder: folder / "missing.json", "missing.json: no such file or folder"),
        (lambda folder: "no-such-org/no-such-model", "huggingface-cli download no-such-org/no-such-model"),
        (lambda folder: _write(folder / "bad.json", "{not json"), "is not a tokenizer.json"),
        (lambda folder: _lowercasing(folder), "does not give back the text it encodes"),
    ],
)
def test_pretrained_refusals_are_one_line(make, match, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ConfigError, match=match) as caught:
        PretrainedTokenizer(str(make(tmp_path)))
    assert "\n" not in str(caught.value)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _lowercasing(folder: Path) -> Path:
    """A tokenizer that lower-cases: it would score an easier text than the one bits per byte divide by."""
    hf = HFTokenizer.from_file(str(gpt2_style_file(folder)))
    hf.normalizer = normalizers.Lowercase()
    path = folder / "lower.json"
    hf.save(str(path))
    return path


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("tokenizer.path=/nowhere/tokenizer.json", "error: tokenizer.path=/nowhere/tokenizer.json: no such file"),
        ("tokenizer.path=null", "error: tokenizer=pretrained is never trained, it needs tokenizer.path"),
    ],
)
def test_train_py_refuses_a_pretrained_tokenizer_without_a_file_in_one_line(setting, message, tmp_path, small_corpus):
    overrides = tiny_overrides("gpt", small_corpus) + [
        "tokenizer=pretrained",
        setting,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    overrides.append(f"paths.cache_dir={tmp_path / 'cache'}")
    result = run_command([sys.executable, "train.py", *overrides], cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message) and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unigram", "bytes", "pretrained"])
def test_a_run_trains_with_each_and_keeps_its_tokenizer_as_json(name, tmp_path, small_corpus, pretrained_file):
    extra = {"unigram": ["tokenizer.vocab_size=400"], "pretrained": [f"tokenizer.path={pretrained_file}"]}
    cfg = compose_config(
        tiny_overrides("gpt", small_corpus) + [f"tokenizer={name}", *extra.get(name, [])], tmp_path / "run"
    )
    metrics = train(cfg)
    assert metrics["tokenizer"] == name and math.isfinite(metrics["test/bpb"])
    assert metrics["val/loss"] < math.log(metrics["vocab_size"])
    saved = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert saved.decode(saved.encode(TRICKY)) == TRICKY


def test_the_report_shows_each_runs_bytes_per_token(tmp_path):
    for tokenizer, tokens in (("bytes", 7000), ("bpe", 2000)):
        run = fake_run(
            tmp_path,
            f"tokenizer={tokenizer}",
            model="gpt",
            tokenizer=tokenizer,
            params=1e5,
            tokens=tokens,
            flops=1e12,
            bpb=2.0,
        )
        metrics = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps({**metrics, "bytes_seen": 7000}))
    report = write_report([tmp_path], tmp_path / "report")
    assert "| bytes/token |" in report.markdown
    assert "| bpe | 1 | 0.001 | 3.50 |" in report.markdown and "| bytes | 1 | 0.001 | 1.00 |" in report.markdown
    with (tmp_path / "report" / "comparison.csv").open() as f:
        assert {row["tokenizer"]: float(row["bytes_per_token"]) for row in csv.DictReader(f)} == {
            "bytes": 1.0,
            "bpe": 3.5,
        }
