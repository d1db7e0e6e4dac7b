"""The points a scaling-law fit is made of: per model family x tokenizer, the runs of a sweep (or of a
published comparison.csv) that record their size, tokens, training FLOPs and score, grouped into
compute budgets, and checked to be scored on one text."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.report.runs import Run
from lmlab.report.tuning import choose_learning_rates

SAME_BUDGET = math.log(1.1)  # runs whose training FLOPs differ by under 10% share a compute budget


@dataclass(frozen=True)
class Point:
    """One run as a fit sees it."""

    run: str
    params: float
    tokens: float
    flops: float
    loss: float


def budget_slices(points: list[Point]) -> list[list[Point]]:
    """Points grouped by training compute (within 10%), smallest budget first."""
    slices: list[list[Point]] = []
    for point in sorted(points, key=lambda p: p.flops):
        if slices and math.log(point.flops / slices[-1][0].flops) < SAME_BUDGET:
            slices[-1].append(point)
        else:
            slices.append([point])
    return slices


def frontier(points: list[Point]) -> list[Point]:
    """The best run of each compute budget: the points the compute frontier goes through."""
    return [min(slice_, key=lambda p: p.loss) for slice_ in budget_slices(points)]


def family_points(runs: Iterable[Run], metric: str) -> dict[tuple[str, str], list[Point]]:
    """Per model x tokenizer, the completed runs at each group's chosen learning rate that record
    parameters, tokens, training FLOPs and `metric`; optimistic runs left out."""
    families: dict[tuple[str, str], list[Point]] = {}
    for choice in choose_learning_rates(runs):
        if choice.optimistic:
            continue
        for run in choice.runs:
            values = [run.score(key) for key in ("params", "tokens_seen", "train_flops", metric)]
            if all(math.isfinite(v) and v > 0 for v in values):
                families.setdefault((run.model, run.tokenizer), []).append(Point(run.label or run.name, *values))
    return families


def spans_sizes_or_budgets(runs: Iterable[Run]) -> bool:
    """Whether some family was run at several sizes or several budgets: a sweep worth fitting."""
    for points in family_points(runs, "val/bpb").values():
        if len({p.params for p in points}) > 1 or len(budget_slices(points)) > 1:
            return True
    return False


def check_same_text(runs: Iterable[Run]) -> str:
    """Refuse runs trained on different text (their run_info.json corpus hashes differ): their bits
    per byte measure different things. Returns a note on how many runs recorded a hash."""
    hashes: dict[str, str] = {}
    runs = list(runs)
    for run in runs:
        try:
            info = json.loads((run.path / "run_info.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(info, dict) and isinstance(info.get("corpus_sha256"), str):
            hashes[run.label or run.name] = info["corpus_sha256"]
    distinct = sorted(set(hashes.values()))
    if len(distinct) > 1:
        examples = ", ".join(
            f"{next(name for name, h in hashes.items() if h == digest)} ({digest[:12]})" for digest in distinct[:2]
        )
        raise ConfigError(
            f"cannot fit runs trained on different text ({len(distinct)} corpus hashes in run_info.json, "
            f"e.g. {examples}): fit the runs of one corpus at a time"
        )
    if not hashes:
        return "The runs record no corpus hash (run_info.json), so that they share one text was not checked."
    if len(hashes) < len(runs):
        return f"{len(hashes)} of {len(runs)} runs record a corpus hash, all the same; the others were not checked."
    return f"All {len(runs)} runs record the same corpus hash ({distinct[0][:12]})."


def runs_from_csv(path: Path) -> list[Run]:
    """The runs of a comparison.csv (a published report without its run directories), as Runs a fit
    can use: the learning rate is chosen again per model, tokenizer and other settings."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from err
    if not rows or "run" not in rows[0]:
        raise ConfigError(f"{path} is not a comparison.csv (no 'run' column): pass one that compare.py wrote")
    runs = []
    for row in rows:
        metrics: dict[str, object] = {key: _number(value) for key, value in row.items() if _number(value) is not None}
        metrics.update(model=row.get("model", "?"), tokenizer=row.get("tokenizer", "?"), status=row.get("status", ""))
        label = row["run"]
        settings = [
            part for part in label.rsplit("/", 1)[-1].split(",") if not part.startswith(("task.optimizer.lr=", "seed="))
        ]
        key = hashlib.sha256(
            json.dumps([row.get("model"), row.get("tokenizer"), sorted(settings)]).encode()
        ).hexdigest()
        seed = _number(row.get("seed", ""))
        runs.append(
            Run(
                name=label,
                path=path.parent,
                metrics=metrics,
                seed=None if seed is None else int(seed),
                config_key=f"{key}:{_number(row.get('lr', ''))}",
                label=label,
                lr=_number(row.get("lr", "")),
                tuning_key=key,
            )
        )
    return runs


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None
