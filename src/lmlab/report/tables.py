"""One column spec for every table of results: sweep reports (Markdown, CSV) and the terminal summaries.

Runs are ranked by test bits per byte: unlike loss or perplexity per token it does not depend on
the tokenizer, so char, word and BPE runs sit on one scale. Runs whose configs differ only in the
seed are repeats of one configuration and are also summarised as mean ± standard deviation.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable
from typing import Any

from lmlab.report.runs import Run, configurations

MODEL_ORDER = ("rnn", "gru", "lstm", "transformer", "gpt")
TOKENIZER_ORDER = ("char", "word", "bpe")
SCORES = ("val/loss", "val/ppl", "val/bpb", "test/loss", "test/ppl", "test/bpb")
RUN_COLUMNS = (
    "run",
    "model",
    "tokenizer",
    "seed",
    "params",
    "tokens_seen",
    "bytes_seen",
    "wall_time_s",
    *SCORES,
    "test/unk_rate",
    "best_step",
    "status",
    "error",
    "path",
)
OPTIONAL = ("test/unk_rate", "error")  # shown in the Markdown table only where some run has one
AVERAGED = ("params", "bytes_seen", "wall_time_s", *SCORES)
HEADERS = {
    "params": "parameters",
    "tokens_seen": "tokens seen",
    "bytes_seen": "bytes seen",
    "wall_time_s": "wall time (s)",
    "val/loss": "val loss",
    "val/ppl": "val ppl",
    "val/bpb": "val bpb",
    "test/loss": "test loss",
    "test/ppl": "test ppl",
    "test/bpb": "test bpb",
    "test/unk_rate": "test unk rate",
    "best_step": "best step",
    "runs": "completed runs",
}
# Decimals by metric name, whatever the split: "val/bpb" and "test/bpb" are both "bpb".
METRIC_DECIMALS = {"loss": 4, "bpb": 4, "ppl": 2, "unk_rate": 4, "wall_time_s": 1}
METRIC_NAMES = {"loss": "loss (nats/token)", "ppl": "perplexity", "bpb": "bits per byte", "unk_rate": "unk rate"}
COUNTS = ("params", "tokens_seen", "bytes_seen", "tokens", "bytes", "steps")
NUMERIC = {"seed", "params", "tokens_seen", "bytes_seen", "wall_time_s", *SCORES, "test/unk_rate", "best_step"}


def _rank(test_bpb: float, name: str) -> tuple:
    """By test bits per byte; runs without one (failed, incomplete) last, by name."""
    return not math.isfinite(test_bpb), test_bpb if math.isfinite(test_bpb) else 0.0, name


def run_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """One row per run (RUN_COLUMNS), best first."""
    rows = [
        {
            "run": run.label or run.name,
            "model": run.model,
            "tokenizer": run.tokenizer,
            "seed": run.seed,
            **{key: run.metrics.get(key) for key in RUN_COLUMNS[4:-3]},
            "status": run.status,
            "error": run.metrics.get("error", ""),
            "path": str(run.path),
        }
        for run in runs
    ]
    return sorted(rows, key=lambda r: _rank(_number(r["test/bpb"]), r["run"]))


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def group_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """One row per configuration: `<key>_mean` and `<key>_std` (sample std over its completed seeds), best first."""
    rows = []
    for members in configurations(runs).values():
        done = [run for run in members if run.completed]
        row: dict[str, Any] = {
            "configuration": members[0].configuration,
            "model": members[0].model,
            "tokenizer": members[0].tokenizer,
            "runs": f"{len(done)}/{len(members)}",
            "seeds": " ".join(str(run.seed) for run in members),
        }
        for key in AVERAGED:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([run.score(key) for run in done])
        rows.append(row)
    return sorted(rows, key=lambda r: _rank(r["test/bpb_mean"], r["configuration"]))


def format_value(key: str, value: Any) -> str:
    """`value` as every table shows it: fixed decimals per metric, thousands separators for counts."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    decimals = METRIC_DECIMALS.get(key.rsplit("/", 1)[-1])
    if isinstance(value, float) and decimals is not None:
        return f"{value:.{decimals}f}"
    if isinstance(value, (int, float)) and key in COUNTS:
        return f"{round(value):,}"
    return str(value)


def _cell(key: str, value: Any) -> str:
    return format_value(key, value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]], columns: Iterable[str]) -> str:
    columns = list(columns)
    lines = [
        "| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
        "|" + "|".join("---:" if c in NUMERIC else "---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(runs: Iterable[Run]) -> str:
    """The per-run table in Markdown (unk rate and error columns only where some run has one)."""
    rows = run_rows(runs)
    columns = [c for c in RUN_COLUMNS[:-1] if c not in OPTIONAL or any(row[c] for row in rows)]
    return markdown_table(rows, columns)


def configurations_table(runs: Iterable[Run]) -> str:
    """The mean ± std table in Markdown, one row per configuration."""
    display = []
    for row in group_rows(runs):
        shown = {key: row[key] for key in ("configuration", "model", "tokenizer", "runs", "seeds")}
        for key in AVERAGED:
            mean, std = _cell(key, row[f"{key}_mean"]), _cell(key, row[f"{key}_std"])
            shown[key] = f"{mean} ± {std}" if mean and std else mean
        display.append(shown)
    return markdown_table(display, ["configuration", "model", "tokenizer", "runs", "seeds", *AVERAGED])


def csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()})
    return buffer.getvalue()


def best_per_pair(runs: Iterable[Run], metric: str = "test/bpb") -> dict[tuple[str, str], tuple[float, float]]:
    """(mean, std) of `metric` of the best configuration of each (model, tokenizer) pair."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for members in configurations(runs).values():
        mean, std = _mean_std([run.score(metric) for run in members if run.completed])
        pair = (members[0].model, members[0].tokenizer)
        if math.isfinite(mean) and (pair not in best or mean < best[pair][0]):
            best[pair] = (mean, std)
    return best
