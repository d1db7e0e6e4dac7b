"""What every benchmark records beside its numbers: the machine, the libraries, the date, the commit.

Results go to bench/results/, or to the folder named by LMLAB_RESULTS_DIR (a device run's $OUT).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("LMLAB_RESULTS_DIR") or ROOT / "bench" / "results")


def git_commit() -> str:
    """The commit the numbers come from, '-dirty' when tracked files have uncommitted changes.

    LMLAB_COMMIT, when set, names it instead: a copy of the tree on another machine (a device run) may
    carry no .git, or a stale one.
    """
    if os.environ.get("LMLAB_COMMIT"):
        return os.environ["LMLAB_COMMIT"]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import pytorch_lightning

        info["lightning"] = pytorch_lightning.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def write_results(name: str, payload: dict) -> Path:
    """`RESULTS/<name>.json`: the payload with the machine, library versions and git commit it came from."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    from lmlab.io import atomic_write_text  # a run stopped while writing leaves the previous file whole

    atomic_write_text(path, json.dumps({"machine": machine(), "commit": git_commit(), **payload}, indent=2) + "\n")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table, printed by the scripts and pasted into docs/benchmarks.md."""

    def cell(v):
        return f"{v:,.3f}" if isinstance(v, float) and abs(v) < 10 else f"{v:,.0f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
