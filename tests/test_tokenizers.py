"""Tokenizers: exact round trips, exact save/load, unknowns, settings errors, chunked encoding."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    base,
    load_tokenizer,
)
from lmlab.tokenizers.base import split_chunks
from lmlab.tokenizers.word import normalize_spacing, split_words

SHAKESPEARE = (Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt").read_text()
TRAIN = SHAKESPEARE[:100_000]
HELD_OUT = SHAKESPEARE[500_000:520_000]
NON_ASCII = "naïve café — 日本語 🙂\n"

FACTORIES = {
    "char": CharTokenizer,
    "word": WordTokenizer,
    "word-closed": lambda: WordTokenizer(unk=True),
    "bpe": lambda: BPETokenizer(512),
}


@pytest.fixture(scope="module", params=list(FACTORIES))
def trained(request) -> Tokenizer:
    tokenizer = FACTORIES[request.param]()
    tokenizer.train(TRAIN)
    return tokenizer


def test_ids_are_int32_within_vocab(trained):
    ids = trained.encode(HELD_OUT)
    assert ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < trained.vocab_size


def test_char_round_trips_seen_text_exactly():
    tokenizer = CharTokenizer()
    tokenizer.train(TRAIN)
    vocabulary = set(TRAIN)
    seen = "".join(c for c in HELD_OUT if c in vocabulary)
    assert tokenizer.decode(tokenizer.encode(seen)) == seen
    assert tokenizer.vocab_size == len(vocabulary) + 1


def test_char_round_trips_non_ascii_it_was_trained_on():
    tokenizer = CharTokenizer()
    tokenizer.train(NON_ASCII)
    assert tokenizer.decode(tokenizer.encode(NON_ASCII)) == NON_ASCII
    assert tokenizer.vocab_size == len(set(NON_ASCII)) + 1


def test_bpe_round_trips_any_text_exactly():
    tokenizer = BPETokenizer(512)
    tokenizer.train(TRAIN)
    for text in (HELD_OUT, NON_ASCII, "a \n\n\t b  \r\n", "<|endoftext|> kept", ""):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.unk_id is None
    assert tokenizer.unknown_symbols(NON_ASCII) == []


def test_closed_word_round_trip_is_normalize_spacing():
    tokenizer = WordTokenizer(min_frequency=1, unk=True)
    tokenizer.train(TRAIN)
    text = (
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
        "All:\n  Resolved.   resolved, o' the  'tis well-met --\n"
    )
    assert tokenizer.unknown_symbols(text) == []
    decoded = tokenizer.decode(tokenizer.encode(text))
    assert decoded == normalize_spacing(text)
    assert decoded == (
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
        "All:\nResolved. resolved, o'the'tis well-met--\n"  # ' binds both ways
    )
    assert normalize_spacing(decoded) == decoded  # idempotent
    lines = TRAIN.splitlines(keepends=True)[:200]
    expected = "".join(map(normalize_spacing, lines))  # newlines reset the spacing
    assert tokenizer.decode(tokenizer.encode("".join(lines))) == expected


def test_word_splits_words_punctuation_and_newlines():
    assert split_words("It's  fine.\n\tOK") == ["It", "'", "s", "fine", ".", "\n", "OK"]


@pytest.mark.parametrize("unk, cap", [(True, 100), (False, 300)])
def test_word_min_frequency_and_max_vocab_size(unk, cap):
    all_words = WordTokenizer(min_frequency=1, unk=unk)
    all_words.train(TRAIN)
    frequent = WordTokenizer(min_frequency=2, unk=unk)
    frequent.train(TRAIN)
    capped = WordTokenizer(min_frequency=1, max_vocab_size=cap, unk=unk)
    capped.train(TRAIN)
    assert all_words.vocab_size > frequent.vocab_size > capped.vocab_size == cap


@pytest.mark.parametrize("make", [CharTokenizer, lambda: WordTokenizer(unk=True)])
def test_unknowns_map_to_unk(make):
    tokenizer = make()
    tokenizer.train("ab ab ab\nba ba\n")
    text = "ab zq ab\n"
    unknown = {"char": ["z", "q"], "word": ["zq"]}[tokenizer.name]
    assert tokenizer.unknown_symbols(text) == unknown
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id == 0
    assert (ids == tokenizer.unk_id).sum() == len(unknown) == tokenizer.count_unknown(text)
    assert tokenizer.emits_unk
    expected = {"char": "ab \ufffd\ufffd ab\n", "word": "ab <unk> ab\n"}[tokenizer.name]
    assert tokenizer.decode(ids) == expected


def test_save_load_is_exact_json(trained, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    trained.save(path)
    assert json.loads(path.read_text())["config"] == trained.config()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    for source in (path, str(path), trained.to_json()):
        loaded = load_tokenizer(source)
        assert type(loaded) is type(trained)
        assert loaded.config() == trained.config()
        assert loaded.vocab_size == trained.vocab_size
        assert loaded.unk_id == trained.unk_id
        assert np.array_equal(loaded.encode(HELD_OUT), trained.encode(HELD_OUT))
        assert loaded.to_json() == trained.to_json()


def test_version_1_word_files_load_as_the_closed_vocabulary_they_were():
    closed = WordTokenizer(min_frequency=1, max_vocab_size=500, unk=True)
    closed.train(TRAIN)
    document = json.loads(closed.to_json())
    document["format"] = "lmlab-tokenizer/1"
    document["config"] = {"name": "word", "min_frequency": 1, "max_vocab_size": 500}  # what version 1 wrote
    loaded = load_tokenizer(json.dumps(document))
    assert loaded.config() == closed.config()
    assert np.array_equal(loaded.encode(HELD_OUT), closed.encode(HELD_OUT))
    assert loaded.decode(loaded.encode(HELD_OUT)) == closed.decode(closed.encode(HELD_OUT))


def test_load_rejects_other_json():
    with pytest.raises(ConfigError, match="not an lmlab tokenizer"):
        load_tokenizer('{"model": {}}')


def test_training_is_deterministic(trained):
    again = type(trained)(**{k: v for k, v in trained.config().items() if k != "name"})
    again.train(TRAIN)
    assert again.to_json() == trained.to_json()


def test_bpe_vocab_size_is_respected():
    tokenizer = BPETokenizer(300)
    tokenizer.train(TRAIN)
    assert tokenizer.vocab_size <= 300
    assert tokenizer.config() == {"name": "bpe", "vocab_size": 300}


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: BPETokenizer(100), "tokenizer.vocab_size=100"),
        (lambda: WordTokenizer(min_frequency=0), "tokenizer.min_frequency=0"),
        (lambda: WordTokenizer(max_vocab_size=1, unk=True), "tokenizer.max_vocab_size=1"),
        (lambda: WordTokenizer(max_vocab_size=256), "tokenizer.max_vocab_size=256"),
        (lambda: WordTokenizer(split="spaces"), "tokenizer.split='spaces'"),
        (lambda: WordTokenizer(eos_per_line=True), "tokenizer.eos_per_line=true needs a closed vocabulary"),
    ],
)
def test_bad_settings_raise_config_error(make, key):
    with pytest.raises(ConfigError, match=key):
        make()


@pytest.mark.parametrize("make", FACTORIES.values())
def test_untrained_use_raises_clearly(make):
    tokenizer = make()
    assert not tokenizer.is_trained
    with pytest.raises(RuntimeError, match="no vocabulary yet"):
        tokenizer.encode("hello")
    with pytest.raises(RuntimeError, match="no vocabulary yet"):
        tokenizer.decode([0])
    with pytest.raises(DataError, match="empty"):
        tokenizer.train("")


def test_split_chunks_cuts_only_at_safe_newlines():
    chunks = list(split_chunks(HELD_OUT, size=1000))
    assert "".join(chunks) == HELD_OUT and len(chunks) > 10
    for left, right in zip(chunks, chunks[1:]):
        assert re.fullmatch(r"[!-~]\n", left[-2:]) and re.match(r"[!-~]", right)
    spaced = " a b \n \n b \n" * 10  # Penn Treebank's layout: cut after a newline, before " b"
    assert list(split_chunks(spaced, size=3)) == [" a b \n \n", " b \n"] * 10
    assert list(split_chunks("a \n\n\tb" * 10, size=3)) == ["a \n\n\tb" * 10]  # no safe place
    assert list(split_chunks("")) == [""]


def test_chunked_encoding_equals_whole_text_encoding(trained, monkeypatch):
    """Parallel chunked encoding, a few chunks per batch, gives the ids of encoding the whole text in one piece."""
    monkeypatch.setattr(base, "ENCODE_BATCH", 3)
    text = HELD_OUT * 8  # several default-size chunks
    assert len(list(split_chunks(text))) > 4
    ids = trained.encode(text)
    pieces = np.concatenate([trained.encode(c) for c in split_chunks(text, size=777)])
    assert np.array_equal(ids, pieces)
    assert ids.tolist() == trained.hf_tokenizer().encode(text).ids  # what an export to transformers gives
    if trained.name == "bpe" or not trained.emits_unk:
        assert trained.decode(ids) == text
