"""Runs as a report sees them: found under sweep or run directories and read from the files every run leaves.

A report reads only metrics.json, config.yaml and curve.csv, so it works on a finished sweep, on one
still running, or on any hand-picked set of run directories, and never trains anything.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import ConfigError


@dataclass(frozen=True)
class Run:
    """One run directory as a report sees it."""

    name: str  # its path under the directory given, e.g. "model=gpt,tokenizer=bpe"
    path: Path
    metrics: dict[str, Any]
    seed: int | None
    config_key: str  # equal for runs whose configs differ at most in the seed
    label: str = ""  # the name without the settings every run of the report shares (see find_runs)
    lr: float | None = None  # task.optimizer.lr
    tuning_key: str = ""  # equal for runs whose configs differ at most in the seed and the learning rate

    @property
    def status(self) -> str:
        return self.metrics.get("status", "incomplete")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def model(self) -> str:
        return str(self.metrics.get("model", "?"))

    @property
    def tokenizer(self) -> str:
        return str(self.metrics.get("tokenizer", "?"))

    @property
    def optimistic(self) -> bool:
        """Scored with `<unk>` tokens: those bytes were never paid for, so its bits per byte flatter it."""
        return any(self.score(f"{split}/unk_rate") > 0 for split in ("val", "test"))

    @property
    def configuration(self) -> str:
        """The run's label without its seed: what its repeats have in common."""
        parts = [part for part in (self.label or self.name).split(",") if not part.startswith("seed=")]
        return ",".join(parts) or f"{self.model},{self.tokenizer}"

    def score(self, key: str) -> float:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) else math.nan


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run under the given sweep or run directories: any folder holding metrics.json or config.yaml.

    A folder with config.yaml but no metrics.json is a run that is still going or was killed; it is
    reported as "incomplete". A run's label is its command-line settings (Hydra's
    .hydra/overrides.yaml, else its folder name) without those every run shares (data.path=...,
    trainer.max_steps=...), which say nothing about how the runs differ.
    """
    roots = [Path(p).expanduser() for p in paths]
    for root in roots:
        if not root.is_dir():
            raise ConfigError(
                f"{root} is not a directory: pass sweep directories (outputs/multirun/<time>) "
                "or run directories (outputs/runs/<run>)"
            )
    found = []  # (the sweep it belongs to, when several are compared; its path under it; its directory)
    for root in roots:
        prefix = f"{root.resolve().name}/" if len(roots) > 1 else ""
        for run_dir in _run_dirs(root):
            relative = run_dir.relative_to(root).as_posix()
            found.append(("", run_dir.name, run_dir) if relative == "." else (prefix, relative, run_dir))
    if not found:
        raise ConfigError(
            f"no runs under {', '.join(map(str, roots))}: a run directory holds metrics.json or "
            "config.yaml; pass a sweep directory (outputs/multirun/<time>) or run directories"
        )
    settings = [_overrides(run_dir) or name.split(",") for _, name, run_dir in found]
    shared = set.intersection(*map(set, settings)) if len(found) > 1 else set()
    return [
        replace(
            load_run(run_dir, prefix + name), label=prefix + (",".join(s for s in parts if s not in shared) or name)
        )
        for (prefix, name, run_dir), parts in zip(found, settings)
    ]


def _overrides(run_dir: Path) -> list[str]:
    """The run's command-line settings as Hydra recorded them ([] if it did not)."""
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def _run_dirs(root: Path) -> list[Path]:
    files = (path for name in ("metrics.json", "config.yaml") for path in root.rglob(name))
    # .hydra/config.yaml is Hydra's copy of the config, not a run
    return sorted({path.parent for path in files if not any(p.startswith(".") for p in path.relative_to(root).parts)})


def load_run(run_dir: Path, name: str | None = None) -> Run:
    """A run from its directory; missing or unreadable metrics make it "incomplete", never an error."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError:
        metrics = {"status": "incomplete"}
    except (OSError, json.JSONDecodeError) as err:
        metrics = {"status": "incomplete", "error": f"unreadable metrics.json: {err}"}
    config = _read_config(run_dir)
    names = config.get("names") or {}
    for key in ("model", "tokenizer"):
        metrics.setdefault(key, names.get(key, "?"))
    name = name or run_dir.name
    lr = _learning_rate(config)
    return Run(
        name=name,
        path=run_dir,
        metrics=metrics,
        seed=config.get("seed"),
        config_key=_config_key(config) if config else f"name:{name}",
        lr=lr,
        tuning_key=_config_key(_without_learning_rate(config)) if config else f"name:{name}",
    )


def _optimizer_node(config: dict[str, Any]) -> dict[str, Any]:
    node = (config.get("task") or {}).get("optimizer")
    return node if isinstance(node, dict) else config.get("optimizer") or {}  # (runs made before task.optimizer)


def _learning_rate(config: dict[str, Any]) -> float | None:
    lr = _optimizer_node(config).get("lr")
    return float(lr) if isinstance(lr, (int, float)) else None


def _without_learning_rate(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its learning rate blanked, so the runs of one learning-rate grid share a key.
    The table of default rates (`adamw_lr`) goes too, and so does an experiment's table of rates per
    optimizer with the point of it a run picks (`lr_grid`): they act only through the rate itself."""
    config = {key: value for key, value in config.items() if key not in ("adamw_lr", "lr_grid")}
    node = _optimizer_node(config)
    blanked = {**node, "lr": None}
    if isinstance((config.get("task") or {}).get("optimizer"), dict):
        return {**config, "task": {**config["task"], "optimizer": blanked}}
    return {**config, "optimizer": blanked}


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _config_key(config: dict[str, Any]) -> str:
    """A digest of the config without the seed and without the run's own directory, which every run has its own of."""
    rest = {key: value for key, value in config.items() if key not in ("seed", "paths")}
    text = json.dumps(rest, sort_keys=True, default=str)
    output_dir = str((config.get("paths") or {}).get("output_dir") or "")
    if output_dir:
        text = text.replace(output_dir, "<run dir>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    """The run's validation points (curve.csv, written by lmlab.callbacks.ValidationCurve) in step order.

    A line cut short by a crash is skipped; a step written twice (a resumed run) keeps its last values.
    """
    points: dict[int, dict[str, float]] = {}
    try:
        with (run_dir / "curve.csv").open(newline="") as f:
            for row in csv.DictReader(f):
                try:
                    point = {key: float(value) for key, value in row.items() if key}
                except (TypeError, ValueError):
                    continue
                if {"step", "bytes_seen", "val/bpb"} <= point.keys():
                    points[int(point["step"])] = point
    except FileNotFoundError:
        return []
    return [points[step] for step in sorted(points)]


def repeated(runs: Iterable[Run]) -> bool:
    """Whether any configuration ran more than once (a sweep over seed=)."""
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        counts[run.config_key] += 1
    return any(count > 1 for count in counts.values())


def configurations(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs grouped by configuration (all settings but the seed)."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.config_key].append(run)
    return dict(groups)
