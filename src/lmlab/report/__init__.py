"""Comparisons of finished (or running) runs: find them (runs), tabulate them (tables), choose each model's
learning rate (tuning), test their differences (blocks, bootstrap) and plot them (plots)."""

from lmlab.report.blocks import load_test_blocks
from lmlab.report.bootstrap import paired_bootstrap
from lmlab.report.comparison import Report, markdown_report, write_report
from lmlab.report.plots import bpb_by_model, compute_frontier, learning_curves
from lmlab.report.runs import Run, find_runs, load_run, read_curve, repeated
from lmlab.report.tables import configurations_table, group_rows, run_rows, runs_table
from lmlab.report.tuning import choose_learning_rates

__all__ = [
    "Report",
    "Run",
    "bpb_by_model",
    "choose_learning_rates",
    "compute_frontier",
    "configurations_table",
    "find_runs",
    "group_rows",
    "learning_curves",
    "load_run",
    "load_test_blocks",
    "markdown_report",
    "paired_bootstrap",
    "read_curve",
    "repeated",
    "run_rows",
    "runs_table",
    "write_report",
]
