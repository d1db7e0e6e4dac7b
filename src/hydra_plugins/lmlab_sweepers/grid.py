"""The grid, extended where the best learning rate sits at its edge (`sweep.extend_grid=true`).

A pair whose best rate is the grid's highest (or lowest) may do better beyond it: its rank is
provisional (lmlab.report.tuning). Instead of a second sweep by hand, this sweeper adds the next rate
(x3 above, /3 below) for each such pair and runs it, and repeats until every best rate is interior
or bracketed by a rate whose runs diverged, or `sweep.max_extra_runs` more jobs have run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

log = logging.getLogger(__name__)

LR_KEY = "task.optimizer.lr"
STEP = 3.0  # the grids of lmlab's recipes are half-decades (1e-3, 3e-3, 1e-2)


def next_rate(choice: Any) -> float | None:
    """The rate beyond the grid's edge that a pair's chosen rate (lmlab.report.tuning.Choice) sits
    at, or None if it needs none."""
    if choice.edge == "highest":
        return float(f"{choice.grid[-1] * STEP:.2g}")
    if choice.edge == "lowest":
        return float(f"{choice.grid[0] / STEP:.2g}")
    return None


def extension_jobs(sweep_dir: Path) -> list[list[str]]:
    """One job per seed of each edge pair: its runs' overrides with the next rate."""
    from lmlab.report.runs import find_runs
    from lmlab.report.tuning import choose_learning_rates

    jobs = []
    for choice in choose_learning_rates(find_runs([sweep_dir])):
        rate = next_rate(choice)
        if rate is None or rate in choice.failed:
            continue
        for run in choice.runs:
            overrides = yaml.safe_load((run.path / ".hydra" / "overrides.yaml").read_text())
            jobs.append([o for o in overrides if not o.startswith(f"{LR_KEY}=")] + [f"{LR_KEY}={rate}"])
    return jobs


class ExtendingGridSweeper(BasicSweeper):
    """Hydra's basic grid sweeper, then the learning-rate extensions that `sweep.extend_grid` asks for."""

    def sweep(self, arguments: list[str]) -> Any:
        returns = super().sweep(arguments)
        settings = self.config.get("sweep") or {}
        if not settings.get("extend_grid", False):
            return returns
        launched, budget = sum(len(batch) for batch in returns), int(settings.get("max_extra_runs", 8))
        while budget > 0:
            jobs = extension_jobs(Path(self.config.hydra.sweep.dir))[:budget]
            if not jobs:
                break
            log.info("extending the learning-rate grid: %d more runs", len(jobs))
            returns.append(self.launcher.launch(jobs, initial_job_idx=launched))
            launched, budget = launched + len(jobs), budget - len(jobs)
        return returns
