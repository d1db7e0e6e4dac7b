"""What a run and an evaluation print in the terminal: the scores table, the run's facts and its sample."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from lmlab.report.tables import METRIC_NAMES, format_value


def scores_table(title: str, rows: dict[str, dict[str, Any]]) -> Table:
    """One row per split (or text), one column per metric of METRIC_NAMES that some row has."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("split")
    metrics = [key for key in METRIC_NAMES if any(row.get(key) is not None for row in rows.values())]
    for key in metrics:
        table.add_column(METRIC_NAMES[key], justify="right")
    for name, row in rows.items():
        table.add_row(name, *(format_value(key, row.get(key)) for key in metrics))
    return table


def print_summary(metrics: dict[str, Any], sample: str, console: Console | None = None) -> None:
    """The end-of-run table (val and test), the run's size and cost, and its sample."""
    console = console or Console()
    rows = {split: {key: metrics.get(f"{split}/{key}") for key in METRIC_NAMES} for split in ("val", "test")}
    console.print(scores_table(f"{metrics['model']} · {metrics['tokenizer']} · {metrics['data']}", rows))
    console.print(
        f"parameters {format_value('params', metrics['params'])} · tokens seen "
        f"{format_value('tokens_seen', metrics['tokens_seen'])} ({format_value('bytes_seen', metrics['bytes_seen'])} "
        f"bytes) · steps {format_value('steps', metrics['steps'])} · wall time {metrics['wall_time_s']:.1f} s"
        + (
            f" (CPU {metrics['cpu_time_s']:.1f} s, {metrics['torch_threads']} threads)"
            if "cpu_time_s" in metrics
            else ""
        )
    )
    if any((metrics.get(f"{split}/unk_rate") or 0) > 0 for split in ("val", "test")):
        console.print(
            "optimistic: some words were scored as <unk>, whose bytes are never paid for; "
            "this run's bits per byte flatter it (tokenizer.unk=false spells them out)"
        )
    console.print(Panel(sample, title="sample", expand=False))
