"""Where a corpus's text comes from: files, folders, split files, read as byte streams.

A corpus is either one text cut into train/val/test by `data.splits`, or three texts given as
its own splits (explicit `data.train/val/test`, or a folder whose file names say which split
they hold, as Penn Treebank and WikiText ship). Every text is a list of files joined by newlines
and read lazily (`ConcatText`), so nothing here holds a corpus in memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmlab.data.corpus import DEFAULT_FRACTIONS, SPLITS, byte_cuts, check_fractions, not_utf8
from lmlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SNIFF_BYTES = 1 << 16  # how much of a folder's file must decode as UTF-8 for it to count as text
READ_BYTES = 1 << 23  # the block size reads of a corpus use

# File-name words that say which split a file holds: ptb.train.txt, wiki.valid.tokens, dev.txt.
_SPLIT_WORDS = {"train": "train", "training": "train", "valid": "val", "val": "val", "validation": "val"}
_SPLIT_WORDS |= {"dev": "val", "test": "test"}


def looks_like_text(path: Path) -> bool:
    """Whether the start of `path` decodes as UTF-8 and holds no NUL byte (binaries rarely pass both)."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:  # a character cut by the sniff's end is still text
        return err.reason == "unexpected end of data" and err.start >= len(head) - 3
    return True


def _visible(folder: Path, path: Path) -> bool:
    return path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)


def folder_files(folder: Path, glob: str | None = None) -> list[Path]:
    """The text files under `folder` (sorted, hidden ones left out), narrowed by `glob` if given.

    Files that are not UTF-8 text (images, archives, model weights) are skipped with one logged line.
    """
    candidates = sorted(p for p in (folder.glob(glob) if glob else folder.rglob("*")) if _visible(folder, p))
    if glob and not candidates:
        raise DataError(
            f"data.glob={glob!r} matches no file in {folder}: fix the pattern (e.g. '*.txt', '**/*.tokens')"
        )
    files = [p for p in candidates if looks_like_text(p)]
    skipped = [p.relative_to(folder).as_posix() for p in candidates if p not in files]
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("data: skipping %d file(s) of %s that are not UTF-8 text: %s", len(skipped), folder, shown)
    if not files:
        raise DataError(
            f"folder {folder} holds no text files (every file was skipped as not UTF-8 text): "
            "put UTF-8 text files in it, narrow data.glob, or set data.path to a file"
        )
    return files


def local_files(path: str | Path, glob: str | None = None, key: str = "data.path") -> list[Path]:
    """The files `path` names: itself, or the text files of a folder (see `folder_files`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{key}={path} does not exist: set {key} to a UTF-8 text file or a folder of them")
    if path.is_dir():
        return folder_files(path, glob)
    if glob:
        raise ConfigError(f"data.glob={glob!r} narrows a folder, but {key}={path} is a file: drop data.glob")
    return [path]


def read_text_file(path: Path) -> str:
    """Read one UTF-8 file, naming the byte offset of the first invalid byte if it is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, raw[err.start], err.start) from None


def read_local_corpus(path: str | Path, glob: str | None = None) -> str:
    """Read a UTF-8 file, or every text file under a folder (sorted, joined by newlines), into memory."""
    files = local_files(path, glob)
    text = "\n".join(read_text_file(f) for f in files)
    if not text.strip():
        raise DataError(f"corpus {path} is empty: give data.path a file with text in it")
    return text


def split_of(path: Path) -> str | None:
    """Which split a file's name says it holds ('train', 'val', 'test'), or None."""
    words = {_SPLIT_WORDS[w] for w in re.split(r"[^a-z0-9]+", path.name.lower()) if w in _SPLIT_WORDS}
    if len(words) > 1:
        raise DataError(
            f"{path.name} names more than one split ({', '.join(sorted(words))}): rename it, or leave it out with data.glob"
        )
    return words.pop() if words else None


class ConcatText:
    """Files read as one byte stream, joined by a newline, without loading them.

    Sizes are taken once; a file that changes size while it is read is an error, since the byte
    split and the corpus hash would no longer describe it.
    """

    def __init__(self, files: list[Path], label: str | None = None) -> None:
        self.files = files
        self.label = label or ", ".join(str(f) for f in files)  # how errors name this text
        self.sizes = [f.stat().st_size for f in files]
        self.starts = [sum(self.sizes[:i]) + i for i in range(len(files))]  # one newline between files
        self.size = sum(self.sizes) + len(files) - 1

    def identity(self) -> list[tuple[str, int, int]]:
        """What the files are now (path, size, modification time): the key of their remembered hash."""
        return [(str(f.resolve()), size, f.stat().st_mtime_ns) for f, size in zip(self.files, self.sizes)]

    def blocks(self, start: int = 0, end: int | None = None, block: int = READ_BYTES) -> Iterator[bytes]:
        """The bytes in [start, end), a block at a time (the newline between files is a block of its own)."""
        end = self.size if end is None else min(end, self.size)
        for path, first, size in zip(self.files, self.starts, self.sizes):
            a, b = max(start, first), min(end, first + size)
            if a < b:
                with path.open("rb") as f:
                    f.seek(a - first)
                    while a < b:
                        data = f.read(min(block, b - a))
                        if not data:
                            raise DataError(f"{path} changed while it was read: run again once it is complete")
                        a += len(data)
                        yield data
            if start <= first + size < end:
                yield b"\n"

    def read(self, start: int, end: int) -> bytes:
        return b"".join(self.blocks(start, end))

    def locate(self, offset: int) -> tuple[Path, int]:
        """The file holding byte `offset` of the stream, and the offset inside it."""
        index = max(i for i, first in enumerate(self.starts) if first <= offset)
        return self.files[index], offset - self.starts[index]


@dataclass(frozen=True)
class CorpusSource:
    """The texts of a corpus: one to cut by `fractions` (key "all"), or one per split."""

    texts: dict[str, ConcatText]
    fractions: tuple[float, ...] | None = None

    @property
    def predefined(self) -> bool:
        return "all" not in self.texts

    @property
    def size(self) -> int:
        return sum(text.size for text in self.texts.values())

    def ranges(self) -> dict[str, tuple[ConcatText, int, int]]:
        """Each split as (text, start, end) byte offsets: its own file(s), or a cut of the one text."""
        if self.predefined:
            return {name: (self.texts[name], 0, self.texts[name].size) for name in SPLITS}
        text = self.texts["all"]
        cuts = byte_cuts(text.size, self.fractions, text.read)
        return {name: (text, a, b) for name, a, b in zip(SPLITS, cuts, cuts[1:])}


def _split_text(files: list[Path], what: str) -> ConcatText:
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{what} {f} is empty: give that split a file with text in it")
    return ConcatText(files, label=f"{what} {'+'.join(str(f) for f in files)}")


def local_source(
    path: str | None = None,
    *,
    train: str | None = None,
    val: str | None = None,
    test: str | None = None,
    glob: str | None = None,
    splits: list[float] | tuple[float, ...] | None = None,
) -> CorpusSource:
    """The corpus that `data.path` (file or folder) or `data.train/val/test` describe.

    A folder holding a file named like a training split (`*train*`) is a corpus with predefined
    splits: it must then also hold `*valid*`/`*val*`/`*dev*` and `*test*` files, and only those are
    read. Any other folder is one text (its files joined), cut by `data.splits`.
    """
    explicit = {"train": train, "val": val, "test": test}
    if check_split_names(path, explicit, splits):
        return CorpusSource(
            {
                name: _split_text(local_files(value, glob, key=f"data.{name}"), f"data.{name} file")
                for name, value in explicit.items()
            }
        )
    if not path:
        raise ConfigError("data.path is not set: pass data.path=FILE_OR_FOLDER, or data.train/val/test=FILE each")
    files = local_files(path, glob)
    roles = {f: split_of(f) for f in files} if Path(path).expanduser().is_dir() else {}
    if any(role == "train" for role in roles.values()):
        named = {name: [f for f, role in roles.items() if role == name] for name in SPLITS}
        absent = [name for name, found in named.items() if not found]
        if absent:
            raise DataError(
                f"folder {path} holds a training file but no {'/'.join(absent)} file "
                "(named like *valid*, *val*, *dev* or *test*): add it, give data.train/val/test, "
                "or narrow data.glob to cut one text by data.splits"
            )
        _refuse_fractions(splits, f"folder {path} holds its own split files")
        others = [f.name for f, role in roles.items() if role is None]
        if others:
            log.warning(
                "data: %s has split files; leaving out %d other file(s): %s", path, len(others), ", ".join(others[:5])
            )
        log.info("data: %s", ", ".join(f"{name}={'+'.join(f.name for f in found)}" for name, found in named.items()))
        return CorpusSource({name: _split_text(found, "split file") for name, found in named.items()})
    fractions = tuple(splits) if splits is not None else DEFAULT_FRACTIONS
    check_fractions(fractions)
    text = ConcatText(files, label=f"corpus {path}")
    if text.size == 0 or all(size == 0 for size in text.sizes):
        raise DataError(f"corpus {path} is empty: give data.path a file with text in it")
    return CorpusSource({"all": text}, fractions)


def check_split_names(path: str | None, explicit: dict[str, str | None], splits: object) -> bool:
    """Whether `data.train/val/test` name the splits; refuses them incomplete or mixed with
    `data.path` or `data.splits`."""
    if not any(explicit.values()):
        return False
    missing = [name for name, value in explicit.items() if not value]
    if missing:
        raise ConfigError(
            f"data.{missing[0]} is not set: give all three of data.train, data.val and data.test, or none of them"
        )
    if path:
        raise ConfigError(
            f"data.path={path} and data.train/val/test are both set: give the corpus one way (set data.path=null)"
        )
    _refuse_fractions(splits, "data.train/val/test are given")
    return True


def _refuse_fractions(splits: object, because: str) -> None:
    if splits is not None:
        raise ConfigError(
            f"data.splits={list(splits)} cannot apply: {because}, which are the splits; "
            "drop data.splits (or give one text in data.path to cut it by data.splits)"
        )
