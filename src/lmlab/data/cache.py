"""Token ids computed once per (corpus, split, tokenizer) and memory-mapped afterwards.

A cache entry is a folder holding the trained tokenizer, one binary array of ids per split and a
`meta.json`. It is built in a temporary folder and renamed into place, so an interrupted build
never leaves an entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.data.corpus import SPLITS
from lmlab.tokenizers import Tokenizer, load_tokenizer

CACHE_FORMAT = 1


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


def cache_key(corpus_sha256: str, splits: list[float], tokenizer_config: dict) -> str:
    payload = json.dumps(
        {"format": CACHE_FORMAT, "corpus": corpus_sha256, "splits": list(splits), "tokenizer": tokenizer_config},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def build_entry(folder: Path, tokenizer: Tokenizer, parts: dict[str, str], corpus_sha256: str) -> None:
    """Train the tokenizer on the training split only (unless it arrives trained), encode every split,
    write the entry atomically."""
    if not tokenizer.is_trained:
        tokenizer.train(parts["train"])
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
            ids = tokenizer.encode(parts[name])
            ids.astype(dtype).tofile(tmp / f"{name}.bin")
            meta["bytes"][name] = len(parts[name].encode("utf-8"))
            meta["tokens"][name] = len(ids)
            meta["unk_tokens"][name] = 0 if tokenizer.unk_id is None else int(np.count_nonzero(ids == tokenizer.unk_id))
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
    corpus_name: str, parts: dict[str, str], splits: list[float], tokenizer: Tokenizer, cache_dir: str | Path
) -> TokenizedCorpus:
    """Return the cached entry for this corpus and tokenizer, building it on the first call."""
    digest = hashlib.sha256()
    for name in SPLITS:
        digest.update(parts[name].encode("utf-8"))
    corpus_sha256 = digest.hexdigest()
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in corpus_name)[:40]
    key = cache_key(corpus_sha256, splits, tokenizer_identity(tokenizer))
    folder = Path(cache_dir).expanduser() / f"{slug}-{tokenizer.name}-{key}"
    if not (folder / "meta.json").exists():
        build_entry(folder, tokenizer, parts, corpus_sha256)
    return load_entry(folder)
