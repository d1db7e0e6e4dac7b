"""Tokenizers trained from a stream, and the safe places a text may be cut: both exact, both memory-bounded.

A corpus larger than memory trains its tokenizer from pieces (`train_from_iterator`) and encodes
pieces cut at safe places (`split_chunks`); both must give exactly what the whole text gives.
"""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lmlab.data.cache import _encode_piece, train_tokenizer
from lmlab.errors import DataError
from lmlab.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, WordTokenizer, base
from lmlab.tokenizers.base import _SAFE_CUT, safe_pieces, split_chunks

DATA = Path(__file__).resolve().parents[1] / "data"
SHAKESPEARE = (DATA / "tinyshakespeare.txt").read_text()[:30_000]
PTB = (DATA / "ptb" / "ptb.train.txt").read_text()[:30_000]  # every line starts and ends with a space


def wikitext_like(lines: list[str]) -> str:
    """WikiText's layout: ' = Title = ', ' = = Section = = ', blank ' ' lines, paragraphs of
    space-separated tokens with @-@ and @,@, every line starting and ending with a space."""
    out = [" = Valkyria Chronicles III = \n", " \n"]
    for i in range(0, len(lines) - 3, 4):
        if i % 40 == 0:
            out += [" \n", f" = = Section {i} @-@ part = = \n", " \n"]
        paragraph = " ".join(line.strip() for line in lines[i : i + 4]).replace(" N ", " 1 @,@ 000 ")
        out.append(f" {paragraph} \n")
    return "".join(out)


def awkward(text: str, seed: int = 0) -> str:
    """`text` with trailing and doubled spaces, tabs, CRLF, blank lines and non-ASCII sprinkled over its lines."""
    rng = random.Random(seed)
    extras = [" ", "  ", "\t", "\r", " \n", "\n\n", "é ", " 日本", "🙂"]
    lines = text.splitlines(keepends=True)
    return "".join(rng.choice(extras) + line if rng.random() < 0.3 else line for line in lines)


TEXTS = {
    "shakespeare": SHAKESPEARE,
    "ptb": PTB,
    "wikitext": wikitext_like(PTB.splitlines()),
    "awkward": awkward(SHAKESPEARE) + awkward(PTB, seed=1),
}
FACTORIES = {
    "char": CharTokenizer,
    "word": WordTokenizer,
    "word-whitespace": lambda: WordTokenizer(split="whitespace"),
    "word-closed": lambda: WordTokenizer(unk=True),
    "ptb_word": lambda: WordTokenizer(min_frequency=1, unk=True, split="whitespace", eos_per_line=True),
    "bpe": lambda: BPETokenizer(400),
}


def random_cuts(text: str, n: int, rng: random.Random) -> list[str]:
    """`text` cut at `n` random places (mid-word, mid-line, between \\r and \\n...), plus empty pieces."""
    cuts = sorted(rng.sample(range(1, len(text)), n))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    return [*pieces[:5], "", *pieces[5:], ""]


@pytest.fixture(scope="module")
def trained() -> dict[tuple[str, str], Tokenizer]:
    """Every tokenizer trained on every text, the plain way."""
    out = {}
    for kind, make in FACTORIES.items():
        for name, text in TEXTS.items():
            out[kind, name] = make()
            out[kind, name].train(text)
    return out


@pytest.mark.parametrize("kind", FACTORIES)
def test_training_from_pieces_cut_anywhere_equals_training_on_the_whole(kind, trained, monkeypatch):
    monkeypatch.setattr(base, "CHUNK_CHARS", 97)  # many chunks, so the regrouping of cut pieces is exercised
    rng = random.Random(kind)
    for name, text in TEXTS.items():
        streamed = FACTORIES[kind]()
        streamed.train_from_iterator(iter(random_cuts(text, 300, rng)))
        assert streamed.to_json() == trained[kind, name].to_json(), name  # same vocabulary, same ids
        one_by_one = FACTORIES[kind]()
        one_by_one.train_from_iterator(text[:4000])  # a string is an iterable of one-character pieces
        whole = FACTORIES[kind]()
        whole.train(text[:4000])
        assert one_by_one.to_json() == whole.to_json(), name


@pytest.mark.parametrize("kind", FACTORIES)
def test_encoding_pieces_cut_at_safe_places_equals_encoding_the_whole(kind, trained):
    rng = random.Random(kind)
    for name, text in TEXTS.items():
        tokenizer = trained[kind, name]
        places = [m.start() for m in _SAFE_CUT.finditer(text)]
        assert len(places) > 60, name  # PTB and WikiText lines start with a space, and still have places
        cuts = sorted(rng.sample(places, min(200, len(places))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        ids = np.concatenate([tokenizer.encode(piece) for piece in pieces])
        assert np.array_equal(ids, tokenizer.encode(text)), name
        assert tokenizer.count_unknown(text) == sum(map(tokenizer.count_unknown, pieces)), name


@pytest.mark.parametrize("left, right", [("a \n", "b"), ("a\n", "  b"), ("a\n", " \nb"), ("a\n\n", "b")])
def test_places_next_to_the_safe_ones_are_refused_because_they_are_unsafe(trained, left, right):
    """Neighbours of the two safe places that the rule refuses: cut there, byte-level BPE's ids change."""
    assert not _SAFE_CUT.search(left + right, len(left), len(left) + 1)
    bpe = trained["bpe", "awkward"]
    assert not np.array_equal(np.concatenate([bpe.encode(left), bpe.encode(right)]), bpe.encode(left + right))


def test_penn_treebank_lines_are_cut_so_every_core_gets_a_piece():
    chunks = list(split_chunks(PTB, size=1000))
    assert "".join(chunks) == PTB and len(chunks) >= len(PTB) // 1100
    assert all(chunk.endswith(" \n") and chunk.startswith(" ") for chunk in chunks[1:-1])


def test_safe_pieces_regroup_any_cuts_into_safely_cut_pieces():
    text = TEXTS["awkward"]
    pieces = list(safe_pieces(random_cuts(text, 500, random.Random(0)), size=200))
    assert "".join(pieces) == text and len(pieces) > 50
    for piece, after in zip(pieces, pieces[1:]):
        assert len(piece) >= 200 and _SAFE_CUT.match(piece + after, len(piece))
    assert list(safe_pieces(["", ""], size=10)) == []
    no_place = "a b c " * 100  # no newline at all: stays whole rather than being cut unsafely
    assert list(safe_pieces(no_place[i : i + 7] for i in range(0, len(no_place), 7))) == [no_place]


def lazy_pieces(total_chars: int, size: int):
    """`total_chars` of Shakespeare in pieces of `size`, made one at a time (never all in memory)."""
    for start in range(0, total_chars, size):
        offset = start % (len(SHAKESPEARE) - size)
        yield SHAKESPEARE[offset : offset + size] + ""  # a fresh string each time


@pytest.mark.parametrize("make", [CharTokenizer, lambda: WordTokenizer(unk=True)], ids=["char", "word"])
def test_training_from_an_iterator_holds_a_few_pieces_not_the_text(make, monkeypatch):
    monkeypatch.setattr(base, "CHUNK_CHARS", 1024)  # HF reads 256 chunks ahead: keep that small beside the text
    tokenizer = make()
    tracemalloc.start()
    try:
        tokenizer.train_from_iterator(lazy_pieces(3_000_000, 4_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tokenizer.is_trained and peak < 1_000_000, peak  # the text is 3 MB


def test_cache_trains_from_the_stream_and_reports_its_bytes(trained):
    done = []
    tokenizer = FACTORIES["ptb_word"]()
    pieces = random_cuts(PTB, 50, random.Random(1))
    train_tokenizer(tokenizer, iter(pieces), lambda phase, nbytes: done.append(nbytes))
    assert tokenizer.to_json() == trained["ptb_word", "ptb"].to_json()
    assert sum(done) == len(PTB.encode("utf-8"))


def test_unknowns_are_counted_from_ids_already_computed(trained, monkeypatch):
    tokenizer = FACTORIES["word-closed"]()
    tokenizer.train(SHAKESPEARE)
    text = "the zyzzyva <unk> and qwxp\n"  # two unknown words; the written <unk> is no loss
    ids = tokenizer.encode(text)
    assert tokenizer.count_unknown(text) == 2
    calls = []
    encode = type(tokenizer)._encode
    monkeypatch.setattr(type(tokenizer), "_encode", lambda self, t: calls.append(t) or encode(self, t))
    assert tokenizer.count_unknown(text, ids) == 2 and calls == []
    piece_ids, nbytes, unknown = _encode_piece(tokenizer, np.dtype(np.uint16), text)
    assert (
        calls == [text] and unknown == 2 and nbytes == len(text) and piece_ids.dtype == np.uint16
    )  # encoded once in the cache
    char = CharTokenizer()
    char.train("abc\n")
    assert char.count_unknown("abxc\n", char.encode("abxc\n")) == 1 == char.count_unknown("abxc\n")


def test_training_from_nothing_is_refused():
    for make in FACTORIES.values():
        with pytest.raises(DataError, match="empty text"):
            make().train_from_iterator(["", ""])
