"""Cutting a corpus into train/val/test by bytes, before any tokenizer sees it.

Splitting the raw text (not the token ids) is what makes bits per byte comparable across
tokenizers: every tokenizer is scored on exactly the same validation and test text. The cut
points are found by `byte_cuts`, which reads only the bytes it needs, so a corpus on disk is cut
exactly as the same text in memory (`split_by_bytes`) without ever being loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from lmlab.errors import DataError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)

ReadBytes = Callable[[int, int], bytes]  # read(start, end) -> the bytes in [start, end)


def not_utf8(path: Path | str, byte: int, offset: int) -> DataError:
    """The error for a file that does not decode as UTF-8, naming where it stops decoding."""
    return DataError(
        f"{path} is not UTF-8 text (invalid byte 0x{byte:02x} at byte offset {offset}): "
        "convert it to UTF-8 (e.g. `iconv -t UTF-8`) or point data.path at a text file"
    )


def check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(
            f"data.splits={list(fractions)} must be three non-negative fractions summing to 1, e.g. [0.9, 0.05, 0.05]"
        )


def _find(read: ReadBytes, needle: bytes, start: int, end: int, block: int = 1 << 20) -> int:
    """The offset of the first `needle` byte in [start, end), or -1; reads `block` bytes at a time."""
    while start < end:
        data = read(start, min(start + block, end))
        if not data:
            break
        found = data.find(needle)
        if found >= 0:
            return start + found
        start += len(data)
    return -1


def byte_cuts(size: int, fractions: Sequence[float], read: ReadBytes) -> list[int]:
    """The offsets [0, a, b, size] that cut `size` bytes of UTF-8 into train/val/test by `fractions`.

    Each cut moves forward to the next line break within 1% of the text (or, failing that, past
    any continuation bytes), so no line or multi-byte character is cut in two and every split is
    valid text. Only the bytes near each cut are read.
    """
    check_fractions(fractions)
    cuts = [0]
    window = max(1, size // 100)
    for target in (fractions[0], fractions[0] + fractions[1]):
        cut = max(int(size * target), cuts[-1])
        newline = _find(read, b"\n", cut, min(cut + window, size))
        cut = newline + 1 if newline >= 0 else cut
        tail = read(cut, min(cut + 4, size))
        cut += next((i for i, b in enumerate(tail) if (b & 0xC0) != 0x80), len(tail))  # never inside a character
        cuts.append(min(cut, size))
    cuts.append(size)
    for name, start, end in zip(SPLITS, cuts, cuts[1:]):
        if start == end:
            raise DataError(
                f"the {name} split is empty: the corpus ({size} bytes) is too small for data.splits={list(fractions)}; "
                "use a larger corpus or give that split a larger fraction"
            )
    return cuts


def split_by_bytes(text: str, fractions: Sequence[float]) -> dict[str, str]:
    """Cut text into train/val/test holding the given fractions of its UTF-8 bytes (see `byte_cuts`)."""
    raw = text.encode("utf-8")
    cuts = byte_cuts(len(raw), fractions, lambda start, end: raw[start:end])
    return {name: raw[a:b].decode("utf-8") for name, a, b in zip(SPLITS, cuts, cuts[1:])}
