"""Preparing a corpus of any size: hash it, cut it, train the tokenizer, encode it, all streamed.

The text is read in blocks, decoded incrementally and regrouped into pieces cut where the
tokenizers' own chunking cuts (`split_chunks`), so encoding piece by piece gives exactly the ids of
encoding each split whole, while memory holds a few pieces rather than the corpus. A corpus's hash
is remembered per file (path, size, modification time), so a run whose token cache exists starts
without reading the text at all.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from itertools import chain
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from lmlab.data.cache import (
    Advance,
    TokenizedCorpus,
    build_entry,
    cache_key,
    cached_entry,
    entry_folder,
    tokenizer_identity,
)
from lmlab.data.corpus import SPLITS, not_utf8
from lmlab.data.sources import ConcatText, CorpusSource
from lmlab.errors import DataError
from lmlab.io import atomic_write_json
from lmlab.tokenizers import Tokenizer
from lmlab.tokenizers.base import split_chunks

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # read blocks and encoded pieces: large enough to keep every core busy
PROGRESS_MIN_BYTES = 32 << 20  # smaller corpora prepare in a few seconds, without a progress bar


def decoded(text: ConcatText, start: int, end: int, block: int) -> Iterator[str]:
    """The UTF-8 text of bytes [start, end) of `text`; an invalid byte is an error naming its file and offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = start
    for data in chain(text.blocks(start, end, block), [b""]):
        pending = decoder.getstate()[0]  # the start of a character cut by the previous block
        try:
            piece = decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            path, at = text.locate(offset - len(pending) + err.start)
            raise not_utf8(path, (pending + data)[err.start], at) from None
        offset += len(data)
        if piece:
            yield piece
    # (the empty block last makes the decoder refuse a character cut off by the end of the range)


def safe_pieces(texts: Iterable[str], size: int) -> Iterator[str]:
    """Regroup `texts` into pieces of about `size` characters cut where `split_chunks` would cut.

    Cutting only there is what makes the ids of the pieces equal the ids of the whole text. A text
    with no such cut stays in one piece (tried again only once it has doubled, to stay linear).
    """
    buffer, retry_at = "", size
    for text in texts:
        buffer += text
        if len(buffer) < retry_at:
            continue
        *ready, buffer = split_chunks(buffer, size)
        yield from ready
        retry_at = size if len(buffer) < size else 2 * len(buffer)
    if buffer:
        yield buffer


def text_pieces(text: ConcatText, start: int, end: int, chunk_bytes: int) -> Iterator[str]:
    """Bytes [start, end) of `text` as safely cut pieces of about `chunk_bytes` characters."""
    return safe_pieces(decoded(text, start, end, chunk_bytes), chunk_bytes)


def corpus_sha256(source: CorpusSource, cache_dir: Path, advance: Advance | None, block: int) -> str:
    """The corpus hash: of the one text (as `tokenize_with_cache` hashes it), or of the three split
    hashes. Remembered under the files' path, size and modification time, so it is computed once."""
    identity = {name: text.identity() for name, text in source.texts.items()}
    memo = cache_dir / "corpus-hashes" / f"{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]}.json"
    try:
        remembered = json.loads(memo.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or cut short: computed again
        remembered = None
    if isinstance(remembered, str) and len(remembered) == 64:
        return remembered
    digests = {}
    for name, text in source.texts.items():
        digest, blank = hashlib.sha256(), True
        for data in text.blocks(block=block):
            digest.update(data)
            blank = blank and not data.strip()
            if advance:
                advance("hashing", len(data))
        if blank:
            raise DataError(f"{text.label} is empty (only whitespace): give it a file with text in it")
        digests[name] = digest.hexdigest()
    if source.predefined:
        sha = hashlib.sha256("".join(f"{name}:{digests[name]}\n" for name in SPLITS).encode()).hexdigest()
    else:
        sha = digests["all"]
    atomic_write_json(memo, {"sha256": sha, "texts": digests, "files": identity})
    return sha


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a lock file), so that processes preparing the same corpus,
    e.g. the ranks of a DDP run, wait for the first one's cache entry instead of each building it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def progress_bar(totals: dict[str, int], enabled: bool) -> Iterator[Advance | None]:
    """An `advance(phase, bytes)` that drives one bar per phase (hashing, reading the train split, encoding), or None."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description:>18}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn()) as progress:
        tasks: dict[str, int] = {}

        def advance(phase: str, nbytes: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=totals.get(phase))
            progress.advance(tasks[phase], nbytes)

        yield advance


def prepare_corpus(
    source: CorpusSource,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    name: str,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool | None = None,
) -> TokenizedCorpus:
    """The token cache entry of `source` for `tokenizer`: loaded if it exists, else built by streaming.

    `progress` None shows the bars only for corpora of PROGRESS_MIN_BYTES or more.
    """
    cache_dir = Path(cache_dir).expanduser()
    totals = {"hashing": source.size}
    started = time.perf_counter()
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
    with (
        locked(cache_dir / "locks" / f"{slug}.lock"),
        progress_bar(totals, source.size >= PROGRESS_MIN_BYTES if progress is None else progress) as advance,
    ):
        sha = corpus_sha256(source, cache_dir, advance, chunk_bytes)
        fractions = None if source.predefined else list(source.fractions)
        folder = entry_folder(cache_dir, name, tokenizer, cache_key(sha, fractions, tokenizer_identity(tokenizer)))

        def build() -> None:  # only when the entry is missing or damaged: reading the text is the slow part
            ranges = source.ranges()
            totals["reading train split"] = ranges["train"][2] - ranges["train"][1]
            totals["encoding"] = sum(end - start for _, start, end in ranges.values())
            pieces = {split: partial(text_pieces, *where, chunk_bytes) for split, where in ranges.items()}
            build_entry(folder, tokenizer, pieces, sha, advance)

        corpus, built = cached_entry(folder, build)
    if built:
        seconds = time.perf_counter() - started
        log.info(
            "data: %s prepared for %s in %.1f s (%.1f MB/s)", name, tokenizer.name, seconds, source.size / 1e6 / seconds
        )
    return corpus
