"""Token ids computed once per (corpus, split, tokenizer) and memory-mapped afterwards.

A cache entry is a folder holding the trained tokenizer, one binary array of ids per split and a
`meta.json`. It is built in a temporary folder (ids appended piece by piece, never all in memory),
synced and renamed into place, so an interrupted build never leaves an entry a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from lmlab.data.corpus import SPLITS
from lmlab.tokenizers import Tokenizer, load_tokenizer

CACHE_FORMAT = 2  # bumped whenever the ids a tokenizer gives for the same settings change (2: PTB <unk>)

Pieces = Callable[[], Iterable[str]]  # a split's text, as pieces its tokenizer may encode one by one
Advance = Callable[[str, int], None]  # progress: (phase, bytes done)


@dataclass(frozen=True)
class TokenizedCorpus:
    """What a run needs from its corpus: the tokenizer, ids per split and the raw-text statistics."""

    tokenizer: Tokenizer
    ids: dict[str, np.ndarray]
    split_bytes: dict[str, int]
    unk_tokens: dict[str, int]
    corpus_sha256: str
    path: Path

    @property
    def split_tokens(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.ids.items()}

    def unk_rate(self, split: str) -> float:
        return self.unk_tokens[split] / max(1, len(self.ids[split]))


def tokenizer_identity(tokenizer: Tokenizer) -> dict:
    """What decides the ids: the settings of a tokenizer still to be trained on this corpus, or the
    whole vocabulary (hashed) of one that arrives trained, e.g. from a checkpoint being fine-tuned."""
    if not tokenizer.is_trained:
        return tokenizer.config()
    return {**tokenizer.config(), "vocabulary_sha256": hashlib.sha256(tokenizer.to_json().encode()).hexdigest()}


def cache_key(corpus_sha256: str, splits: list[float] | None, tokenizer_config: dict) -> str:
    """`splits` is None for a corpus with its own split files (their hash already says where they part)."""
    payload = json.dumps(
        {
            "format": CACHE_FORMAT,
            "corpus": corpus_sha256,
            "splits": None if splits is None else list(splits),
            "tokenizer": tokenizer_config,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def entry_folder(cache_dir: str | Path, corpus_name: str, tokenizer: Tokenizer, key: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in corpus_name)[:40]
    return Path(cache_dir).expanduser() / f"{slug}-{tokenizer.name}-{key}"


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def train_tokenizer(tokenizer: Tokenizer, pieces: Iterable[str], advance: Advance | None = None) -> None:
    """Train on the training split only, streamed: the tokenizer reads the pieces one at a time and
    learns what it would from their concatenation, so memory never holds the split."""

    def reported(pieces: Iterable[str]) -> Iterator[str]:
        for piece in pieces:
            if advance:
                advance("reading train split", len(piece.encode("utf-8")))
            yield piece

    tokenizer.train_from_iterator(reported(pieces))


ENCODE_THREADS = min(4, os.cpu_count() or 1)  # pieces encoded at once (and held: a few tens of MB each)


def _encode_piece(tokenizer: Tokenizer, dtype: np.dtype, piece: str) -> tuple[np.ndarray, int, int]:
    """(ids, bytes, unknown tokens) of one piece."""
    ids = tokenizer.encode(piece)
    unknown = 0
    if tokenizer.emits_unk and np.any(ids == tokenizer.unk_id):  # unknowns are some of the <unk> ids
        unknown = tokenizer.count_unknown(piece, ids)  # (PTB's own written <unk>s are not unknown)
    return ids.astype(dtype), len(piece.encode("utf-8")), unknown


def _in_order(pool: ThreadPoolExecutor, work: Callable, items: Iterable, ahead: int) -> Iterator:
    """`pool.map(work, items)` that reads at most `ahead` items in advance, so memory stays bounded."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(work, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _encode_split(tokenizer: Tokenizer, pieces: Iterable[str], out, dtype, advance: Advance | None) -> tuple[int, ...]:
    """Append the ids of every piece to `out`, encoding a few pieces at once on threads (the HF
    tokenizers and numpy release the GIL; the next pieces are read meanwhile); returns (bytes,
    tokens, unknown tokens)."""
    nbytes = ntokens = nunk = 0
    with ThreadPoolExecutor(ENCODE_THREADS) as pool:
        for ids, size, unknown in _in_order(pool, partial(_encode_piece, tokenizer, dtype), pieces, ENCODE_THREADS):
            ids.tofile(out)
            nbytes, ntokens, nunk = nbytes + size, ntokens + len(ids), nunk + unknown
            if advance:
                advance("encoding", size)
    return nbytes, ntokens, nunk


def build_entry(
    folder: Path,
    tokenizer: Tokenizer,
    splits: Mapping[str, Pieces],
    corpus_sha256: str,
    advance: Advance | None = None,
) -> None:
    """Train the tokenizer on the training split only (unless it arrives trained), encode every split
    piece by piece into its ids file, and move the finished entry into place atomically."""
    if not tokenizer.is_trained:
        train_tokenizer(tokenizer, splits["train"](), advance)
    dtype = _id_dtype(tokenizer.vocab_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        meta = {
            "format": CACHE_FORMAT,
            "corpus_sha256": corpus_sha256,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.config(),
            "bytes": {},
            "tokens": {},
            "unk_tokens": {},
        }
        for name in SPLITS:
            with open(tmp / f"{name}.bin", "wb") as out:
                counts = _encode_split(tokenizer, splits[name](), out, dtype, advance)
                out.flush()
                os.fsync(out.fileno())
            meta["bytes"][name], meta["tokens"][name], meta["unk_tokens"][name] = counts
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same entry first: keep theirs
            if not (folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_entry(folder: Path) -> TokenizedCorpus:
    meta = json.loads((folder / "meta.json").read_text())
    ids = {
        name: np.memmap(folder / f"{name}.bin", dtype=meta["dtype"], mode="r")
        if meta["tokens"][name]
        else np.zeros(0, dtype=meta["dtype"])
        for name in SPLITS
    }
    return TokenizedCorpus(
        tokenizer=load_tokenizer(folder / "tokenizer.json"),
        ids=ids,
        split_bytes=meta["bytes"],
        unk_tokens=meta["unk_tokens"],
        corpus_sha256=meta["corpus_sha256"],
        path=folder,
    )


def tokenize_with_cache(
    corpus_name: str, parts: dict[str, str], splits: list[float] | None, tokenizer: Tokenizer, cache_dir: str | Path
) -> TokenizedCorpus:
    """The cached entry for split texts already in memory, built on the first call."""
    digest = hashlib.sha256()
    for name in SPLITS:
        digest.update(parts[name].encode("utf-8"))
    corpus_sha256 = digest.hexdigest()
    folder = entry_folder(
        cache_dir, corpus_name, tokenizer, cache_key(corpus_sha256, splits, tokenizer_identity(tokenizer))
    )
    if not (folder / "meta.json").exists():
        build_entry(
            folder, tokenizer, {name: (lambda part=part: [part]) for name, part in parts.items()}, corpus_sha256
        )
    return load_entry(folder)
