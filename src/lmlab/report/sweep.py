"""The Hydra callback that ends every multirun with an answer: a comparison of its runs.

Registered in conf/train.yaml under `hydra.callbacks`. Hydra calls `on_multirun_end` once all jobs
of the sweep have ended (with any sweeper: the basic grid or Optuna), and the report is written
into the sweep directory beside the runs. Before any job starts, `on_multirun_start` refuses a grid
left empty (a learning-rate grid or a size list), which would otherwise run jobs with no value.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import USER_ERROR_EXIT, ConfigError, LmlabError
from lmlab.report import runs_table, write_report
from lmlab.report.fit_report import FitRequest

log = logging.getLogger(__name__)


# Grids a comparison needs at least one value of, and an example of each.
GRIDS = {
    "task.optimizer.lr": "1e-3,3e-3,1e-2",
    "budget.target_params": "25000,50000,100000",
    "model": "gpt,lstm",
    "tokenizer": "char,bpe",
}


def check_grids(config: DictConfig) -> None:
    """Refuse a swept setting with no value, from the recipe (hydra.sweeper.params) or the command line."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    swept = {key: str(value) for key, value in params.items()}
    for override in OmegaConf.select(config, "hydra.overrides.task") or []:
        key, _, value = str(override).partition("=")
        swept[key.lstrip("+~")] = value
    for key, example in GRIDS.items():
        if key in swept and not any(value.strip() for value in swept[key].split(",")):
            raise ConfigError(
                f"the {key} grid is empty: give it at least one value, e.g. hydra.sweeper.params.{key}={example} "
                f"(or {key}={example} on the command line with -m)"
            )


class ComparisonReport(Callback):
    """comparison.csv/.md and the plots (lmlab.report.comparison) in the sweep directory, and the table on the console.

    A sweep that runs some family at several sizes or budgets also gets the scaling-law fits."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_grids(config)
        except ConfigError as err:  # before any job: the same one line and exit code as a job's user error
            print(f"error: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = write_report([sweep_dir], sweep_dir, fit=FitRequest(only_if_spanning=True))
        except LmlabError as err:
            log.warning(f"no comparison report: {err}")
            return
        print(
            f"\n{runs_table(report.runs)}\n\nComparison of {len(report.runs)} runs written to "
            f"{sweep_dir / 'comparison.md'} (table, plots: {', '.join(p.name for p in report.files if p.suffix == '.png')})"
        )
