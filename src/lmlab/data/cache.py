"""Token ids computed once per (corpus, split, tokenizer) and memory-mapped afterwards.

A cache entry is a folder holding the trained tokenizer, one binary array of ids per split and a
`meta.json`. It is built in a temporary folder (ids appended piece by piece, never all in memory),
synced and renamed into place, so an interrupted build never leaves an entry a later run would trust.

An entry is checked whenever it is loaded (`load_entry`): meta.json complete, each ids file exactly
its token count long, every id inside the vocabulary, the tokenizer readable. Files damaged after
the fact (a power cut before the disk wrote them, a disk error, a stray edit) would otherwise give
silently wrong bits per byte; such an entry is rebuilt with a notice (`cached_entry`), never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from lmlab.data.corpus import SPLITS
from lmlab.errors import ConfigError, DataError
from lmlab.io import atomic_write_text, disk_full, fsync_folder, shared_mode
from lmlab.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bumped whenever the ids a tokenizer gives for the same settings change (2: PTB <unk>)

ID_CHECK_CHUNK = 1 << 24  # ids read at once when checking them against the vocabulary (64 MB of uint32)
IDS_CHECKED = "ids_checked.json"  # each .bin's size and mtime when its ids were last read through
STAMP_SETTLE_NS = 2_000_000_000  # a file written this recently is not stamped: it is read through again

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
    piece by piece into its ids file, and move the finished entry into place atomically.

    Every file and the folder are fsynced before the rename, and the parent after it, so a power cut
    leaves the whole entry or none. A full disk ends in one line (DiskFull), no entry left behind.
    """
    if not tokenizer.is_trained:
        train_tokenizer(tokenizer, splits["train"](), advance)
    dtype = _id_dtype(tokenizer.vocab_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(tmp, shared_mode())  # mkdtemp makes owner-only folders; a cache may be shared between users
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
        with open(tmp / "meta.json", "w") as out:
            out.write(json.dumps(meta, indent=2))
            out.flush()
            os.fsync(out.fileno())
        fsync_folder(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same entry first: keep theirs
            if not (folder / "meta.json").exists():
                raise
        fsync_folder(folder.parent)
    except OSError as err:
        full = disk_full(
            err,
            f"the token cache in {folder.parent}",
            "free some space, or set paths.cache_dir (LMLAB_CACHE) to a disk with room",
        )
        if full is not None:
            raise full from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class DamagedEntry(DataError):
    """A cache entry whose files do not hold what its meta.json says: rebuilt, never used."""


def load_entry(folder: Path) -> TokenizedCorpus:
    """The entry in `folder`, checked: a DamagedEntry (one line, naming what is wrong) if any part is off."""
    meta = _read_meta(folder)
    dtype = np.dtype(meta["dtype"])
    ids = {}
    checked = _ids_checked(folder)
    for name in SPLITS:
        path, tokens = folder / f"{name}.bin", meta["tokens"][name]
        size = path.stat().st_size if path.is_file() else None
        if size != tokens * dtype.itemsize:
            found = "missing" if size is None else f"{size} bytes"
            raise DamagedEntry(
                f"token cache entry {folder} is damaged: {name}.bin is {found}, meta.json says "
                f"{tokens} tokens x {dtype.itemsize} bytes"
            )
        ids[name] = np.memmap(path, dtype=dtype, mode="r") if tokens else np.zeros(0, dtype=dtype)
        if checked.get(name) != _file_stamp(path):
            _check_ids(ids[name], meta["vocab_size"], folder, name)
    _record_ids_checked(folder)
    if not (folder / "tokenizer.json").is_file():
        raise DamagedEntry(f"token cache entry {folder} is damaged: its tokenizer.json is missing")
    try:
        tokenizer = load_tokenizer(folder / "tokenizer.json")
    except ConfigError as err:
        raise DamagedEntry(f"token cache entry {folder} is damaged: {err}") from None
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DamagedEntry(
            f"token cache entry {folder} is damaged: its tokenizer has {tokenizer.vocab_size} ids, "
            f"meta.json says {meta['vocab_size']}"
        )
    return TokenizedCorpus(
        tokenizer=tokenizer,
        ids=ids,
        split_bytes=meta["bytes"],
        unk_tokens=meta["unk_tokens"],
        corpus_sha256=meta["corpus_sha256"],
        path=folder,
    )


def _read_meta(folder: Path) -> dict:
    """meta.json, with every field the entry is read by present and of the right kind."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise DamagedEntry(
            f"token cache entry {folder} is damaged: meta.json cannot be read ({type(err).__name__})"
        ) from None

    def counts(key: str) -> bool:
        table = meta.get(key)
        return isinstance(table, dict) and all(
            isinstance(table.get(name), int) and not isinstance(table.get(name), bool) and table[name] >= 0
            for name in SPLITS
        )

    complete = (
        isinstance(meta, dict)
        and meta.get("format") == CACHE_FORMAT
        and meta.get("dtype") in ("uint16", "uint32")
        and isinstance(meta.get("vocab_size"), int)
        and meta["vocab_size"] > 0
        and isinstance(meta.get("corpus_sha256"), str)
        and all(counts(key) for key in ("bytes", "tokens", "unk_tokens"))
    )
    if not complete:
        raise DamagedEntry(f"token cache entry {folder} is damaged: meta.json is incomplete")
    return meta


def _check_ids(ids: np.ndarray, vocab_size: int, folder: Path, split: str) -> None:
    """Every id must index the vocabulary (the embedding would fail, or read another token's row)."""
    for start in range(0, len(ids), ID_CHECK_CHUNK):
        largest = int(ids[start : start + ID_CHECK_CHUNK].max())
        if largest >= vocab_size:
            raise DamagedEntry(
                f"token cache entry {folder} is damaged: {split}.bin holds id {largest}, beyond the vocabulary of {vocab_size}"
            )


def _file_stamp(path: Path) -> list[int] | None:
    """What changes when a file is written to: its size and modification time."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _ids_checked(folder: Path) -> dict[str, list[int]]:
    """The stamps of the .bin files whose every id was checked, so that a 4 GB corpus is read through
    once, not at each start (23 s there); a file written to since gets a new stamp and is read again."""
    try:
        stamps = json.loads((folder / IDS_CHECKED).read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _record_ids_checked(folder: Path) -> None:
    """Stamps for the files just read through, except those written in the last seconds: a write
    within the file system's timestamp tick would not change the stamp, so those are read again."""
    settled = time.time_ns() - STAMP_SETTLE_NS
    stamps = {
        name: stamp
        for name in SPLITS
        if (stamp := _file_stamp(folder / f"{name}.bin")) is not None and stamp[1] < settled
    }
    if stamps != _ids_checked(folder):
        try:
            atomic_write_text(folder / IDS_CHECKED, json.dumps(stamps))
        except OSError:  # a cache shared read-only: the next start reads the ids again
            pass


def cached_entry(folder: Path, build: Callable[[], None]) -> tuple[TokenizedCorpus, bool]:
    """The entry in `folder` and whether it was built now: loaded if it is whole, else (re)built.

    A damaged entry is removed and built again, with a notice; one still damaged after its rebuild
    is refused in one line. Callers hold the cache's lock, so no other process is building it.
    """
    if folder.exists():
        try:
            return load_entry(folder), False
        except DamagedEntry as err:
            log.warning("%s: rebuilding it", err)
            shutil.rmtree(folder)
    build()
    try:
        return load_entry(folder), True
    except DamagedEntry as err:
        raise DataError(f"{err}, right after it was built: check the disk, or set paths.cache_dir elsewhere") from None


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
    pieces = {name: (lambda part=part: [part]) for name, part in parts.items()}
    return cached_entry(folder, lambda: build_entry(folder, tokenizer, pieces, corpus_sha256))[0]
