"""The end-of-run table and sample in the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_summary(metrics: dict[str, Any], sample: str, console: Console | None = None) -> None:
    console = console or Console()
    title = f"{metrics['model']} · {metrics['tokenizer']} · {metrics['data']}"
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("split")
    for column in ("loss (nats/token)", "perplexity", "bits per byte", "unk rate"):
        table.add_column(column, justify="right")
    for split in ("val", "test"):
        table.add_row(split, *(_fmt(metrics[f"{split}/{key}"]) for key in ("loss", "ppl", "bpb", "unk_rate")))
    console.print(table)
    facts = (
        f"parameters {_fmt(metrics['params'])} · tokens seen {_fmt(metrics['tokens_seen'])} "
        f"({_fmt(metrics['bytes_seen'])} bytes) · steps {_fmt(metrics['steps'])} · wall time {metrics['wall_time_s']:.1f} s"
    )
    console.print(facts)
    console.print(Panel(sample, title="sample", expand=False))
