"""Learning rates tuned per model: each group of runs that differ only in the learning rate (and the
seed) is one model x tokenizer x setting, whose rate is chosen by validation bits per byte.

Choosing by validation and ranking by test keeps the test split out of every decision. A choice at
either end of its grid says the grid did not bracket the best rate: the group may do better at a
rate beyond it, so its rank is provisional until the grid is extended that way.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from lmlab.report.runs import Run


@dataclass(frozen=True)
class Choice:
    """One model x tokenizer (x other settings) group and the learning rate chosen for it."""

    model: str
    tokenizer: str
    setting: str  # what else sets the group apart (e.g. "budget.target_params=50000"), "" if nothing
    lr: float | None  # the chosen rate (None: no run of the group completed, or runs without a rate)
    grid: tuple[float, ...]  # every rate of the group with a completed run, ascending
    runs: tuple[Run, ...]  # the chosen rate's completed runs (its seeds)
    failed: tuple[float, ...]  # rates none of whose runs completed (e.g. diverged)
    diverged: tuple[float, ...] = ()  # the failed rates whose runs all stopped on a NaN or infinite loss

    def mean(self, key: str) -> float:
        values = [run.score(key) for run in self.runs if math.isfinite(run.score(key))]
        return statistics.fmean(values) if values else math.nan

    def std(self, key: str) -> float:
        values = [run.score(key) for run in self.runs if math.isfinite(run.score(key))]
        return statistics.stdev(values) if len(values) > 1 else math.nan

    @property
    def edge(self) -> str:
        """ "lowest" or "highest" when the chosen rate is at that end of a grid of two or more, else "".

        A rate beyond the chosen one whose runs diverged brackets the grid as well as a scored one:
        the best rate lies between them, so no extension is asked for.
        """
        if self.lr is None or len(self.grid) < 2:
            return ""
        if self.lr == self.grid[0] and not any(lr < self.lr for lr in self.diverged):
            return "lowest"
        if self.lr == self.grid[-1] and not any(lr > self.lr for lr in self.diverged):
            return "highest"
        return ""

    @property
    def optimistic(self) -> bool:
        return any(run.optimistic for run in self.runs)

    @property
    def name(self) -> str:
        return ", ".join(part for part in (self.model, self.tokenizer, self.setting) if part)


def _setting(run: Run) -> str:
    """The run's label without model, tokenizer, learning rate and seed: what else its group varies.

    A group can gather runs from several sweeps (a grid split over GPUs, or extended later), so the
    sweep's name that prefixes a merged label ("sweep/model=gru") names none of them and is dropped.
    """
    dropped = ("model=", "tokenizer=", "task.optimizer.lr=", "lr_grid.point=", "seed=")
    parts = (_without_sweep(p) for p in (run.label or run.name).split(","))
    return ",".join(p for p in parts if p and not p.startswith(dropped))


def _diverged(run: Run) -> bool:
    """Stopped by lmlab's check for a NaN or infinite loss or weights (lmlab.callbacks), a sign of too
    high a rate, unlike a crash or a kill, which says nothing about the rate."""
    error = str(run.metrics.get("error", "")).lower()
    return run.status == "failed" and any(f"became {word}" in error for word in ("nan", "inf", "-inf"))


def _without_sweep(part: str) -> str:
    key, equals, value = part.partition("=")
    return key.rsplit("/", 1)[-1] + equals + value if equals else part


def choose_learning_rates(runs: Iterable[Run]) -> list[Choice]:
    """One Choice per group of runs differing only in learning rate and seed, best test bits per byte
    first; groups scored with `<unk>` after those that pay for every byte, groups with no completed run last.

    Within a group the rate with the lowest mean val/bpb over its completed seeds is chosen.
    """
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.tuning_key].append(run)
    choices = []
    for members in groups.values():
        by_lr: dict[float | None, list[Run]] = defaultdict(list)
        for run in members:
            by_lr[run.lr].append(run)
        done = {lr: [r for r in group if r.completed] for lr, group in by_lr.items()}
        scored = {
            lr: statistics.fmean(r.score("val/bpb") for r in group)
            for lr, group in done.items()
            if group and all(math.isfinite(r.score("val/bpb")) for r in group)
        }
        best = min(scored, key=lambda lr: (scored[lr], lr or 0.0)) if scored else None
        grid = tuple(sorted(lr for lr in scored if lr is not None))
        failed = tuple(sorted(lr for lr in by_lr if lr is not None and lr not in scored))
        diverged = tuple(lr for lr in failed if all(_diverged(r) for r in by_lr[lr]))
        first = members[0]
        chosen = tuple(done[best]) if scored else ()
        choices.append(Choice(first.model, first.tokenizer, _setting(first), best, grid, chosen, failed, diverged))

    def rank(choice: Choice) -> tuple:
        test = choice.mean("test/bpb")
        return not math.isfinite(test), choice.optimistic, test if math.isfinite(test) else 0.0, choice.name

    return sorted(choices, key=rank)


def tuned(choices: list[Choice]) -> bool:
    """Whether any group tried more than one learning rate (the report then shows the choices)."""
    return any(len(choice.grid) + len(choice.failed) > 1 for choice in choices)
