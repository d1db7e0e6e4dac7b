"""Run and sweep directories that no other run or sweep shares.

Default directory names carry the second a run starts, so runs started in the same second (a shell
loop of background jobs, say) would write into one directory. `ClaimFreshDirs`, a Hydra callback,
claims the name just before Hydra runs: it creates the directory with an atomic `mkdir`, taking
`<name>-2`, `<name>-3`, ... when another process got there first. The `lmlab_fresh_dir` resolver,
which names the default directories in conf/, then answers with the claimed name. The resolver has
no side effect of its own, because OmegaConf also evaluates values while merging configs (an
experiment recipe replacing the sweep directory, for one), and that must not create directories.

A directory given by hand (`hydra.run.dir=`) or resumed can still be named by two processes at once
(two seeds started on one directory, a SLURM requeue while the old job still runs). `RunDirLock`
holds an exclusive `flock` on `<run>/.lock` for the run's lifetime, so the second writer is refused
in one line naming the holder, instead of both mixing their checkpoints and curves.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import ConfigError
from lmlab.run.labels import varying_overrides
from lmlab.run.sweep_resume import unfinished_sweep

RESOLVER = "lmlab_fresh_dir"
JOB_DIR_RESOLVER = "lmlab_job_dir"
MAX_JOB_DIR = 80  # characters; file systems allow 255 bytes per name, and paths stay readable
UNSAFE = re.compile(r"[^A-Za-z0-9=,._+\-]")

_claimed: dict[str, str] = {}


def claim_fresh_dir(path: str) -> str:
    """Create `path`, or the first free one of `path-2`, `path-3`, ..., and return it.

    `mkdir` without `exist_ok` lets exactly one process take each name. The answer is remembered,
    so every later reading of the same default gives the directory claimed.
    """
    if path not in _claimed:
        candidate, n = path, 1
        while True:
            try:
                Path(candidate).mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                candidate = f"{path}-{n}"
        _claimed[path] = candidate
    return _claimed[path]


def claimed_dir(path: str) -> str:
    """The `lmlab_fresh_dir` resolver: the directory claimed for `path` in this process, else `path`."""
    return _claimed.get(path, path)


class ClaimFreshDirs(Callback):
    """Claims the run directory (`python train.py`) or the sweep directory (`-m`) before it is used.

    Only directories named through `lmlab_fresh_dir` are claimed: one given on the command line
    (`hydra.run.dir=...`) is the user's choice, and a resumed run goes on in its existing directory.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _claim(config.hydra.run, resuming=bool(config.get("ckpt_path")))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep started by the same command that did not finish is continued in its own directory
        (lmlab.run.sweep_resume); otherwise the sweep gets a fresh one. Either way its multirun.yaml
        is written now, as the grid sweeper does (Optuna's writes none), so a rerun can find it."""
        if RESOLVER in str(OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]):
            default = str(config.hydra.sweep.dir)
            earlier = unfinished_sweep(Path(default).parent, config)
            if earlier is not None:
                print(f"continuing the unfinished sweep {earlier}")
                _claimed[default] = str(earlier)
        _claim(config.hydra.sweep, resuming=False)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, sweep_dir / "multirun.yaml")


def _claim(node: DictConfig, resuming: bool) -> None:
    if RESOLVER not in str(OmegaConf.to_container(node, resolve=False)["dir"]):
        return
    folder = str(node.dir)
    if folder in _claimed.values():  # a sweep being continued: its directory is taken already
        return
    if not (resuming and Path(folder).is_dir()):
        claim_fresh_dir(folder)


def job_dir_name(overrides: str, job_number: int | str, _root_: DictConfig | None = None) -> str:
    """A sweep job's folder name: its overrides (`model=gpt,tokenizer=bpe`) when they make a short, safe
    name; otherwise the readable start of them with characters that are not safe in a name replaced,
    the job number and a hash of the full overrides, so that names stay unique and under MAX_JOB_DIR.

    As the `lmlab_job_dir` resolver (`_root_`: the job's config), only the overrides of the keys the
    sweep varies name the folder (lmlab.run.labels), so that TensorBoard's run names, like the
    report's `run` column, leave out the settings every run shares.
    The full overrides stay in the job's `.hydra/overrides.yaml` and `config.yaml`.
    """
    hydra = OmegaConf.select(_root_, "hydra") if _root_ is not None else None
    varying = varying_overrides(hydra) if hydra is not None else None
    overrides = overrides if varying is None else varying
    if not overrides:
        return f"job{job_number}"
    safe = UNSAFE.sub("_", overrides)
    if safe == overrides and len(overrides) <= MAX_JOB_DIR:
        return overrides
    digest = hashlib.sha256(overrides.encode()).hexdigest()[:8]
    tail = f"-job{job_number}-{digest}"
    return safe[: MAX_JOB_DIR - len(tail)].rstrip("_,") + tail


LOCK_FILE = ".lock"


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 alone): only rank 0 of a run holds the lock,
    the other ranks of a DDP or FSDP job write into the same directory with it."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return int(os.environ.get("NODE_RANK", "0") or 0) + int(os.environ.get("LOCAL_RANK", "0") or 0)


class RunDirLock:
    """An exclusive lock on a run directory, held from `acquire` until the `with` block ends.

    `flock` is released by the kernel when the process dies, however it dies, so a killed run never
    leaves a stale lock; `.lock` holds the holder's PID and host for the refusal message.
    """

    def __init__(self) -> None:
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, run_dir: Path) -> None:
        """Create `run_dir` and lock it; a ConfigError naming the holder if another process has it."""
        run_dir.mkdir(parents=True, exist_ok=True)
        if launch_rank() != 0 or self.held:
            return
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split() or ["?", "?"]
            os.close(fd)
            pid, host = (holder + ["?"])[:2]
            raise ConfigError(
                f"{run_dir} is in use by another run (PID {pid} on {host}): wait for it to end, or give this "
                "run its own directory (leave hydra.run.dir unset)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None
