"""What a run needs to be reproduced: seed, library versions, code commit and corpus hash.

Written to `<run dir>/run_info.json` and shown in TensorBoard's Text tab, so a result found months
later still says which code, which libraries and which exact text produced it.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmlab.repo import REPO_ROOT

# distribution name -> module: the version recorded is that of the code actually imported
PACKAGES = {
    "lmlab": "lmlab",
    "torch": "torch",
    "pytorch-lightning": "pytorch_lightning",
    "hydra-core": "hydra",
    "omegaconf": "omegaconf",
    "tokenizers": "tokenizers",
    "numpy": "numpy",
}


def package_versions() -> dict[str, str | None]:
    """Versions of the libraries whose changes can change a run's numbers (None if not importable)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name, module in PACKAGES.items():
        try:
            versions[name] = str(importlib.import_module(module).__version__)
        except (ImportError, AttributeError):
            versions[name] = None
    return versions


def git_state(folder: Path = REPO_ROOT) -> dict[str, Any] | None:
    """The commit checked out in `folder` and whether tracked files differ from it; None outside git.

    `--no-optional-locks` keeps `git status` from rewriting the index, so recording the state never
    collides with someone committing in the same checkout. LMLAB_COMMIT, when set, names the commit
    instead: a copy of the tree on another machine may carry no .git, or a stale one.
    """
    if os.environ.get("LMLAB_COMMIT"):
        return {"commit": os.environ["LMLAB_COMMIT"], "dirty": None}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or git too slow
        return None
    return {"commit": commit, "dirty": dirty}


def collect_run_info(seed: int, corpus_sha256: str, resumed_from: str | None = None) -> dict[str, Any]:
    """This start of the run: seed, versions, commit, corpus hash, command line, device."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {
        "seed": seed,
        "corpus_sha256": corpus_sha256,
        "git": git_state(),
        "versions": package_versions(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "device": device,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": resumed_from,
    }


def merge_with_earlier(info: dict[str, Any], path: Path) -> dict[str, Any]:
    """`info` plus the starts already recorded in `path`: a resumed run keeps its whole history."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return info
    history = earlier.pop("earlier_starts", [])
    return {**info, "earlier_starts": [*history, earlier]}


def as_markdown(info: dict[str, Any]) -> str:
    """The record as a fenced JSON block: TensorBoard's Text tab renders Markdown."""
    return "```\n" + json.dumps({k: v for k, v in info.items() if k != "earlier_starts"}, indent=2) + "\n```"
