"""Run and sweep directories that no other run or sweep shares.

Default directory names carry the second a run starts, so runs started in the same second (a shell
loop of background jobs, say) would write into one directory. `ClaimFreshDirs`, a Hydra callback,
claims the name just before Hydra runs: it creates the directory with an atomic `mkdir`, taking
`<name>-2`, `<name>-3`, ... when another process got there first. The `lmlab_fresh_dir` resolver,
which names the default directories in conf/, then answers with the claimed name. The resolver has
no side effect of its own, because OmegaConf also evaluates values while merging configs (an
experiment recipe replacing the sweep directory, for one), and that must not create directories.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

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
        (lmlab.run.sweep_resume); otherwise the sweep gets a fresh one."""
        if RESOLVER in str(OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]):
            default = str(config.hydra.sweep.dir)
            earlier = unfinished_sweep(Path(default).parent, config)
            if earlier is not None:
                print(f"continuing the unfinished sweep {earlier}")
                _claimed[default] = str(earlier)
                return
        _claim(config.hydra.sweep, resuming=False)


def _claim(node: DictConfig, resuming: bool) -> None:
    if RESOLVER not in str(OmegaConf.to_container(node, resolve=False)["dir"]):
        return
    folder = str(node.dir)
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
