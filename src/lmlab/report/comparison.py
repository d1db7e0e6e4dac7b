"""comparison.md/.csv and the plots: the answer every multirun and `compare.py` end with."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.io import atomic_write_text
from lmlab.report.fit_plots import fit_figure
from lmlab.report.fit_report import FitAnalysis, FitRequest, analyse
from lmlab.report.fit_text import FIGURE, fit_markdown
from lmlab.report.plots import bpb_by_model, compute_frontier, has_flops, learning_curves, save_figure
from lmlab.report.runs import Run, find_runs, repeated
from lmlab.report.significance import significance_rows
from lmlab.report.tables import (
    AVERAGED,
    RUN_COLUMNS,
    configurations_table,
    csv_text,
    format_value,
    group_rows,
    markdown_table,
    run_rows,
    runs_table,
)
from lmlab.report.tuning import Choice, choose_learning_rates, tuned

CHOICE_COLUMNS = ("rank", "choice", "lr", "grid", "edge", "val/bpb", "test/bpb", "seeds", "scoring")
SIGNIFICANCE_COLUMNS = ("run", "difference", "interval", "verdict")


@dataclass(frozen=True)
class Report:
    """What write_report wrote, and from which runs."""

    runs: list[Run]
    markdown: str
    files: list[Path]


def markdown_report(runs: list[Run], title: str = "Comparison", fit_section: str = "") -> str:
    """comparison.md: how to read it, the mean ± std table when seeds repeat, the run table, the
    scaling-law fits when asked for (`fit_section`) and the plots."""
    completed = sum(run.completed for run in runs)
    parts = [
        f"# {title}",
        "",
        f"{len(runs)} runs, {completed} completed; written {datetime.now():%Y-%m-%d %H:%M}.",
        "Sorted by test bits per byte (lower is better): it does not depend on the tokenizer, so every row "
        "is on one scale. Runs that did not complete are listed last, with their error.",
        "",
    ]
    if any(run.optimistic for run in runs):
        parts += [
            "Runs marked *optimistic* were scored with `<unk>` tokens (a nonzero unk rate): predicting `<unk>` "
            "is easier than spelling the word, so their bits per byte are optimistic. They rank below every "
            "run that pays for every byte, whatever their score.",
            "",
        ]
    parts += [
        "Wall times are comparable only between runs made one at a time on an otherwise idle machine; "
        "CPU time and the thread count are shown beside them where runs record them.",
        "",
    ]
    choices = choose_learning_rates(runs)
    if tuned(choices):
        parts += ["## Learning rate chosen per model", "", _choices_text(choices), ""]
    significance = significance_rows(choices)
    if significance:
        parts += ["## Is the difference real?", "", _significance_text(choices, significance), ""]
    if repeated(runs):
        parts += ["## Mean ± std over seeds", "", configurations_table(runs), ""]
    parts += [
        "## Runs",
        "",
        runs_table(runs),
        "",
        *([fit_section] if fit_section else []),
        "## Plots",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![bits per byte by model](bpb_by_model.png)",
        "",
    ]
    if has_flops(runs):
        parts += ["![compute frontier](compute_frontier.png)", ""]
    return "\n".join(parts)


def _choices_text(choices: list[Choice]) -> str:
    """The table of chosen learning rates: rank by test bpb, the rate chosen by val bpb, and edge flags."""
    rows = []
    for rank, choice in enumerate(choices, 1):
        std = choice.std("test/bpb")
        test = format_value("test/bpb", choice.mean("test/bpb"))
        rows.append(
            {
                "rank": rank if choice.runs else "",
                "choice": choice.name,
                "lr": format_value("lr", choice.lr),
                "grid": " ".join(f"{lr:.3g}" for lr in choice.grid)
                + "".join(f" ({lr:.3g} failed)" for lr in choice.failed),
                "edge": f"at the {choice.edge} rate: extend the grid" if choice.edge else "",
                "val/bpb": choice.mean("val/bpb"),
                "test/bpb": f"{test} ± {format_value('test/bpb', std)}" if test and std == std else test,
                "seeds": len(choice.runs),
                "scoring": "optimistic" if choice.optimistic else "",
            }
        )
    text = markdown_table(rows, CHOICE_COLUMNS)
    note = (
        "Each row's learning rate is the one of its grid with the lowest validation bits per byte (mean over "
        "seeds); rows are ranked by the test bits per byte of that rate. A rate at the edge of its grid may "
        "not be the best one: extend the grid that way before trusting the row's rank."
    )
    return f"{note}\n\n{text}"


def _significance_text(choices: list[Choice], rows: list[dict]) -> str:
    best = next(c for c in choices if c.runs and not c.optimistic)
    note = (
        f"Test bits per byte of each row minus that of the best, **{best.name}**, with a 95% paired "
        "bootstrap interval (2,000 resamples of the test text's blocks, seeded; docs/comparisons.md). "
        '"Not significant": the interval covers zero, so the test text cannot tell the two apart.'
    )
    shown = [{**row, "difference": format_value("test/bpb", row.get("difference"))} for row in rows]
    return f"{note}\n\n{markdown_table(shown, SIGNIFICANCE_COLUMNS)}"


def check_one_protocol(runs: Iterable[Run]) -> None:
    """Refuse to rank completed runs scored under different eval.context protocols (a run that does
    not record its protocol predates eval.context and is taken as comparable)."""
    protocols: dict[str, int] = {}
    for run in runs:
        if run.completed and "eval_context" in run.metrics:
            protocols[str(run.metrics["eval_context"])] = protocols.get(str(run.metrics["eval_context"]), 0) + 1
    if len(protocols) > 1:
        counts = ", ".join(f"{name}: {n} runs" for name, n in sorted(protocols.items()))
        raise ConfigError(
            f"these runs were scored with different eval.context protocols ({counts}), which give different bits "
            "per byte: compare runs scored alike, or pass --mixed-eval to rank them anyway"
        )


def write_report(
    paths: Iterable[str | Path], out_dir: str | Path, mixed_eval: bool = False, fit: FitRequest | None = None
) -> Report:
    """comparison.csv, comparison.md, learning_curves.png and bpb_by_model.png (and, for repeats,
    comparison_by_configuration.csv; for runs that record training FLOPs, compute_frontier.png; for
    `fit`, the scaling-law section and fit.png) in `out_dir`, from the runs under `paths`. Runs scored
    with different eval.context protocols are refused unless `mixed_eval`: their bits per byte
    measure different things."""
    paths = [Path(p) for p in paths]
    runs = find_runs(paths)
    if not mixed_eval:
        check_one_protocol(runs)
    out = Path(out_dir)
    analysis, fit_section = _fit(runs, fit)
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
    files["comparison.md"] = markdown_report(runs, title, fit_section)
    written = []
    for name, text in files.items():
        atomic_write_text(out / name, text)
        written.append(out / name)
    figures = {"learning_curves.png": learning_curves, "bpb_by_model.png": bpb_by_model}
    if has_flops(runs):
        figures["compute_frontier.png"] = compute_frontier
    for name, draw in figures.items():
        save_figure(draw(runs), out / name)
        written.append(out / name)
    if analysis is not None:
        save_figure(fit_figure(analysis), out / FIGURE)
        written.append(out / FIGURE)
    return Report(runs=runs, markdown=files["comparison.md"], files=written)


def _fit(runs: list[Run], fit: FitRequest | None) -> tuple[FitAnalysis | None, str]:
    """The fits and their section. Asked for explicitly, a refusal ends the command in one line; at
    the end of a sweep (`only_if_spanning`) it only replaces the section, so the comparison is still written."""
    if fit is None:
        return None, ""
    try:
        analysis = analyse(runs, fit)
    except ConfigError as err:
        if not fit.only_if_spanning:
            raise
        return None, f"## Scaling-law fits\n\nNot fitted: {err}\n"
    return analysis, "" if analysis is None else fit_markdown(analysis)


def write_fit(runs: list[Run], out_dir: str | Path, fit: FitRequest) -> Report:
    """fit.md and fit.png alone, for runs known only from a comparison.csv (no run directories)."""
    analysis = analyse(runs, fit)
    out = Path(out_dir)
    markdown = fit_markdown(analysis, heading="#")
    atomic_write_text(out / "fit.md", markdown)
    save_figure(fit_figure(analysis), out / FIGURE)
    return Report(runs=runs, markdown=markdown, files=[out / "fit.md", out / FIGURE])
