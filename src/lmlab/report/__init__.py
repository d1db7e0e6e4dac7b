"""Comparisons of finished (or running) runs: find them (runs), tabulate them (tables), plot them (plots)."""

from lmlab.report.comparison import Report, markdown_report, write_report
from lmlab.report.plots import bpb_by_model, learning_curves
from lmlab.report.runs import Run, find_runs, load_run, read_curve, repeated
from lmlab.report.tables import configurations_table, group_rows, run_rows, runs_table

__all__ = [
    "Report",
    "Run",
    "bpb_by_model",
    "configurations_table",
    "find_runs",
    "group_rows",
    "learning_curves",
    "load_run",
    "markdown_report",
    "read_curve",
    "repeated",
    "run_rows",
    "runs_table",
    "write_report",
]
