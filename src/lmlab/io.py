"""Files written so that a crash at any moment leaves either the old file or the new one, never half.

Results, configs, tokenizers, checkpoints and reports are written through here, and
`safe_output_path` keeps names that come from configs inside the directory they are meant for.
A full disk ends such a write in one line (`DiskFull`), the previous file intact.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from lmlab.errors import ConfigError, DiskFull

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # the process's umask, read once (it can only be read by setting it)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full device, a spent quota


def shared_mode(mode: int = 0o777) -> int:
    """`mode` as the umask allows it: what files and folders made the ordinary way get."""
    return mode & ~_UMASK


def disk_full(err: BaseException, target: str | Path, advice: str) -> DiskFull | None:
    """The one-line error for `err` if it is a full disk while writing `target`, else None."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return DiskFull(f"no space left on the device writing {target}: {advice}")
    return None


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file whose content replaces `path` only once it is fully written and on disk.

    It is written under a hidden temporary name in the same folder (so the rename cannot cross
    file systems), fsynced, then renamed over `path`: a kill mid-write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, shared_mode(0o666))  # mkstemp makes owner-only files; results should read like any other
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = disk_full(err, path, "the previous file is kept; free some space, then run the same command again")
        if full is not None:
            raise full from None
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the rename itself survive a power cut, where the OS lets a folder be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def safe_output_path(root: str | Path, name: str | Path, key: str = "path") -> Path:
    """`root / name` resolved, refused with a ConfigError if it lands outside `root`.

    Config values (a checkpoint file name, an output file) may hold `..` or an absolute path; this
    is the check that they can only write where the run keeps its files. `key` names the config
    entry in the message.
    """
    root = Path(root).expanduser().resolve()
    path = (root / Path(name).expanduser()).resolve()
    if path != root and root not in path.parents:
        raise ConfigError(f"{key}={name} would write to {path}, outside {root}: give {key} a path inside {root}")
    return path
