"""A Hugging Face `datasets` split as a text file: its text column, row by row, joined by newlines.

The text is written once into the cache (`<cache>/text/`) and then read like any local corpus, so
the same streamed, exact byte split applies; a split read with `streaming=True` never has to fit
in memory or on the Arrow cache at all. Empty rows are dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lmlab.errors import DataError
from lmlab.io import atomic_open

log = logging.getLogger(__name__)

ROWS_PER_BATCH = 1000
PROGRESS_MIN_ROWS = 200_000  # smaller splits are written in a moment, without a progress bar


def open_split(path: str, config_name: str | None, split: str, streaming: bool) -> Any:
    """The dataset split: `load_from_disk` for a `save_to_disk` folder, else `load_dataset`."""
    import datasets

    try:
        local = Path(path).expanduser()
        if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(local))
            table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            return table.to_iterable_dataset() if streaming else table
        return datasets.load_dataset(path, config_name, split=split, streaming=streaming)
    except Exception as err:  # datasets raises many types; all mean "cannot load this corpus"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"could not load Hugging Face dataset '{path}' (split '{split}'): {reason}; "
            "check data.path/data.split, or set HF_DATASETS_OFFLINE=1 to use the local cache"
        ) from None


def _write_rows(table: Any, column: str, out, what: str) -> int:
    """Write the column's non-empty rows joined by newlines; returns the bytes written."""
    rows = getattr(table, "num_rows", None)
    show = rows is None or rows >= PROGRESS_MIN_ROWS
    columns = (TextColumn(f"writing {what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    written = 0
    with Progress(*columns, disable=not show) as progress:
        task = progress.add_task(what, total=rows)
        for batch in table.iter(batch_size=ROWS_PER_BATCH):
            if column not in batch:
                raise DataError(f"{what} has no column '{column}' (columns: {list(batch)}): set data.text_column")
            for text in batch[column]:
                if text:
                    data = (b"\n" if written else b"") + text.encode("utf-8")
                    out.write(data)
                    written += len(data)
            progress.advance(task, len(batch[column]))
    return written


def dataset_text(
    path: str, config_name: str | None, split: str, text_column: str, streaming: bool, cache_dir: str | Path
) -> Path:
    """The file holding `split`'s text, written on first use and found again by the dataset's identity
    (name, config, split, column, and the Arrow fingerprint of a dataset that has one)."""
    table = open_split(path, config_name, split, streaming)
    what = f"dataset '{path}' split '{split}'"
    names = getattr(table, "column_names", None)
    if names is not None and text_column not in names:
        raise DataError(f"dataset '{path}' has no column '{text_column}' (columns: {names}): set data.text_column")
    identity = {
        "path": str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path,
        "config": config_name,
        "split": split,
        "column": text_column,
        "fingerprint": getattr(table, "_fingerprint", None),  # Arrow datasets: changes with their content
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{Path(path).name}-{split}")[:60]
    target = Path(cache_dir).expanduser() / "text" / f"{slug}-{key}.txt"
    if target.exists():
        return target
    log.info("data: writing the text of %s to %s", what, target)
    with atomic_open(target) as out:
        if not _write_rows(table, text_column, out, what):
            raise DataError(f"dataset '{path}' has no text in column '{text_column}' (split '{split}')")
    return target
