"""comparison.md/.csv and the plots: the answer every multirun and `compare.py` end with."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lmlab.io import atomic_write_text
from lmlab.report.plots import bpb_by_model, learning_curves, save_figure
from lmlab.report.runs import Run, find_runs, repeated
from lmlab.report.tables import AVERAGED, RUN_COLUMNS, configurations_table, csv_text, group_rows, run_rows, runs_table


@dataclass(frozen=True)
class Report:
    """What write_report wrote, and from which runs."""

    runs: list[Run]
    markdown: str
    files: list[Path]


def markdown_report(runs: list[Run], title: str = "Comparison") -> str:
    """comparison.md: how to read it, the mean ± std table when seeds repeat, the run table and the plots."""
    completed = sum(run.completed for run in runs)
    parts = [
        f"# {title}",
        "",
        f"{len(runs)} runs, {completed} completed; written {datetime.now():%Y-%m-%d %H:%M}.",
        "Sorted by test bits per byte (lower is better): it does not depend on the tokenizer, so every row "
        "is on one scale. Runs that did not complete are listed last, with their error.",
        "",
    ]
    if any(run.score("test/unk_rate") > 0 for run in runs):
        parts += [
            "A nonzero unk rate means the tokenizer replaced rare words by `<unk>`: predicting `<unk>` is "
            "easier than spelling the word, so those runs' bits per byte are optimistic.",
            "",
        ]
    if repeated(runs):
        parts += ["## Mean ± std over seeds", "", configurations_table(runs), ""]
    parts += [
        "## Runs",
        "",
        runs_table(runs),
        "",
        "## Plots",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![bits per byte by model](bpb_by_model.png)",
        "",
    ]
    return "\n".join(parts)


def write_report(paths: Iterable[str | Path], out_dir: str | Path) -> Report:
    """comparison.csv, comparison.md, learning_curves.png and bpb_by_model.png (and, for repeats,
    comparison_by_configuration.csv) in `out_dir`, from the runs under `paths`."""
    paths = [Path(p) for p in paths]
    runs = find_runs(paths)
    out = Path(out_dir)
    files = {"comparison.csv": csv_text(run_rows(runs), list(RUN_COLUMNS))}
    if repeated(runs):
        columns = [
            "configuration",
            "model",
            "tokenizer",
            "runs",
            "seeds",
            *(f"{key}_{stat}" for key in AVERAGED for stat in ("mean", "std")),
        ]
        files["comparison_by_configuration.csv"] = csv_text(group_rows(runs), columns)
    title = "Comparison of " + ", ".join(p.name or str(p) for p in paths)
    files["comparison.md"] = markdown_report(runs, title)
    written = []
    for name, text in files.items():
        atomic_write_text(out / name, text)
        written.append(out / name)
    for name, figure in (("learning_curves.png", learning_curves(runs)), ("bpb_by_model.png", bpb_by_model(runs))):
        save_figure(figure, out / name)
        written.append(out / name)
    return Report(runs=runs, markdown=files["comparison.md"], files=written)
