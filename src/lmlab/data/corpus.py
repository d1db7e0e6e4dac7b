"""Reading a corpus and cutting it into train/val/test by bytes, before any tokenizer sees it.

Splitting the raw text (not the token ids) is what makes bits per byte comparable across
tokenizers: every tokenizer is scored on exactly the same validation and test text.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import DataError

SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".py", ".html", ".xml", ""}


def read_text_file(path: Path) -> str:
    """Read one UTF-8 file, naming the byte offset of the first invalid byte if it is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte 0x{raw[err.start]:02x} at byte offset {err.start}): "
            "convert it to UTF-8 (e.g. `iconv -t UTF-8`) or point data.path at a text file"
        ) from None


def read_local_corpus(path: str | Path) -> str:
    """Read a UTF-8 file, or every text file under a folder (sorted, joined by newlines)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"corpus path {path} does not exist: set data.path to a UTF-8 text file or a folder of them")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(
                f"folder {path} holds no text files (.txt, .md, ...): put UTF-8 text files in it or set data.path to a file"
            )
        text = "\n".join(read_text_file(f) for f in files)
    else:
        text = read_text_file(path)
    if not text.strip():
        raise DataError(f"corpus {path} is empty: give data.path a file with text in it")
    return text


def split_by_bytes(text: str, fractions: tuple[float, ...] | list[float]) -> dict[str, str]:
    """Cut text into train/val/test holding the given fractions of its UTF-8 bytes.

    Each cut moves forward to the next line break (or, failing that, the next character), so no
    word or multi-byte character is cut in two and every split is valid text.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(
            f"data.splits={list(fractions)} must be three non-negative fractions summing to 1, e.g. [0.9, 0.05, 0.05]"
        )
    raw = text.encode("utf-8")
    cuts = [0]
    for target in (fractions[0], fractions[0] + fractions[1]):
        cut = max(int(len(raw) * target), cuts[-1])
        newline = raw.find(b"\n", cut, cut + max(1, len(raw) // 100))
        cut = newline + 1 if newline >= 0 else cut
        while cut < len(raw) and (raw[cut] & 0xC0) == 0x80:  # never inside a multi-byte character
            cut += 1
        cuts.append(min(cut, len(raw)))
    cuts.append(len(raw))
    parts = {name: raw[a:b].decode("utf-8") for name, a, b in zip(SPLITS, cuts, cuts[1:])}
    for name, part in parts.items():
        if not part:
            raise DataError(
                f"the {name} split is empty: the corpus ({len(raw)} bytes) is too small for data.splits={list(fractions)}; "
                "use a larger corpus or give that split a larger fraction"
            )
    return parts
