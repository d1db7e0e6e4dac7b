"""The Hydra callback that ends every multirun with an answer: a comparison of its runs.

Registered in conf/train.yaml under `hydra.callbacks`. Hydra calls `on_multirun_end` once all jobs
of the sweep have ended (with any sweeper: the basic grid or Optuna), and the report is written
into the sweep directory beside the runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lmlab.errors import LmlabError
from lmlab.report import runs_table, write_report

log = logging.getLogger(__name__)


class ComparisonReport(Callback):
    """comparison.csv/.md and the plots (lmlab.report.comparison) in the sweep directory, and the table on the console."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = write_report([sweep_dir], sweep_dir)
        except LmlabError as err:
            log.warning(f"no comparison report: {err}")
            return
        print(
            f"\n{runs_table(report.runs)}\n\nComparison of {len(report.runs)} runs written to "
            f"{sweep_dir / 'comparison.md'} (table, plots: learning_curves.png, bpb_by_model.png)"
        )
