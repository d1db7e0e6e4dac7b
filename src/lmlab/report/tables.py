"""One column spec for every table of results: sweep reports (Markdown, CSV) and the terminal summaries.

Runs are ranked by test bits per byte: unlike loss or perplexity per token it does not depend on
the tokenizer, so char, word and BPE runs sit on one scale. A run scored with `<unk>` tokens is
"optimistic" (its unknown words' bytes were never paid for) and ranks below every run that pays for
every byte, whatever its score. Runs whose configs differ only in the seed are repeats of one
configuration and are also summarised as mean ± standard deviation.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable
from typing import Any

from lmlab.report.runs import Run, configurations

TOKENIZER_ORDER = ("char", "word", "bpe")


def model_order() -> tuple[str, ...]:
    """Model families in the registry's display order. Imported when asked: the registry brings the
    models, and torch, which reading a sweep's results does not otherwise need."""
    from lmlab.models.registry import family_names

    return tuple(family_names())


SCORES = ("val/loss", "val/ppl", "val/bpb", "test/loss", "test/ppl", "test/bpb")
METRIC_COLUMNS = (  # read from metrics.json
    "params",
    "tokens_seen",
    "bytes_seen",
    "train_flops",
    "wall_time_s",
    "cpu_time_s",
    "torch_threads",
    *SCORES,
    "test_full/bpb",
    "test/unk_rate",
    "best_step",
    "eval_context",
)
# bytes_per_token: the training text's UTF-8 bytes per token, how much text one prediction covers
RUN_COLUMNS = (
    "run",
    "model",
    "tokenizer",
    "seed",
    "lr",
    "bytes_per_token",
    *METRIC_COLUMNS,
    "scoring",
    "status",
    "error",
    "path",
)
# shown in the Markdown table only where some run has one
OPTIONAL = (
    "lr",
    "bytes_per_token",
    "train_flops",
    "cpu_time_s",
    "torch_threads",
    "test_full/bpb",
    "test/unk_rate",
    "eval_context",
    "scoring",
    "error",
)
AVERAGED = ("params", "bytes_seen", "wall_time_s", *SCORES)
OPTIMISTIC = "optimistic"  # the scoring column of a run scored with <unk> tokens
HEADERS = {
    "params": "parameters",
    "tokens_seen": "tokens seen",
    "bytes_seen": "bytes seen",
    "bytes_per_token": "bytes/token",
    "train_flops": "training FLOPs",
    "wall_time_s": "wall time (s)",
    "cpu_time_s": "CPU time (s)",
    "torch_threads": "threads",
    "val/loss": "val loss",
    "val/ppl": "val ppl",
    "val/bpb": "val bpb",
    "test/loss": "test loss",
    "test/ppl": "test ppl",
    "test/bpb": "test bpb",
    "test_full/bpb": "test bpb, full context",
    "eval_context": "scored with",
    "test/unk_rate": "test unk rate",
    "best_step": "best step",
    "runs": "completed runs",
    "difference": "test bpb minus the best's",
    "interval": "95% interval",
    "lr": "learning rate",
    "grid": "rates tried",
    "edge": "edge of grid",
}
# Decimals by metric name, whatever the split: "val/bpb" and "test/bpb" are both "bpb".
METRIC_DECIMALS = {
    "bytes_per_token": 2,
    "loss": 4,
    "bpb": 4,
    "ppl": 2,
    "unk_rate": 4,
    "wall_time_s": 1,
    "cpu_time_s": 1,
}
METRIC_NAMES = {"loss": "loss (nats/token)", "ppl": "perplexity", "bpb": "bits per byte", "unk_rate": "unk rate"}
COUNTS = ("params", "tokens_seen", "bytes_seen", "tokens", "bytes", "steps")
NUMERIC = {"seed", "lr", "seeds", "rank", "bytes_per_token", *METRIC_COLUMNS} - {"eval_context"}


def _rank(test_bpb: float, name: str, optimistic: bool = False) -> tuple:
    """By test bits per byte, runs that pay for every byte first; runs without a score (failed,
    incomplete) last, by name."""
    return not math.isfinite(test_bpb), optimistic, test_bpb if math.isfinite(test_bpb) else 0.0, name


def run_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """One row per run (RUN_COLUMNS), best first."""
    rows = [
        {
            "run": run.label or run.name,
            "model": run.model,
            "tokenizer": run.tokenizer,
            "seed": run.seed,
            "lr": run.lr,
            "bytes_per_token": run.score("bytes_seen") / run.score("tokens_seen") if run.score("tokens_seen") else None,
            **{key: run.metrics.get(key) for key in METRIC_COLUMNS},
            "scoring": OPTIMISTIC if run.optimistic else "",
            "status": run.status,
            "error": run.metrics.get("error", ""),
            "path": str(run.path),
        }
        for run in runs
    ]
    return sorted(rows, key=lambda r: _rank(_number(r["test/bpb"]), r["run"], r["scoring"] == OPTIMISTIC))


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
            "scoring": OPTIMISTIC if any(run.optimistic for run in members) else "",
        }
        for key in AVERAGED:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([run.score(key) for run in done])
        rows.append(row)
    return sorted(rows, key=lambda r: _rank(r["test/bpb_mean"], r["configuration"], r["scoring"] == OPTIMISTIC))


def format_value(key: str, value: Any) -> str:
    """`value` as every table shows it: fixed decimals per metric, thousands separators for counts."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    decimals = METRIC_DECIMALS.get(key.rsplit("/", 1)[-1])
    if isinstance(value, float) and decimals is not None:
        return f"{value:.{decimals}f}"
    if isinstance(value, (int, float)) and key in COUNTS:
        return f"{round(value):,}"
    if isinstance(value, (int, float)) and key in ("train_flops", "lr"):
        return f"{value:.3g}"
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
    varies = len({row["eval_context"] for row in rows}) > 1  # the protocol earns a column only where it varies
    columns = [
        c
        for c in RUN_COLUMNS[:-1]
        if (c not in OPTIONAL or any(row[c] for row in rows)) and (c != "eval_context" or varies)
    ]
    return markdown_table(rows, columns)


def configurations_table(runs: Iterable[Run]) -> str:
    """The mean ± std table in Markdown, one row per configuration."""
    display, optimistic = [], False
    for row in group_rows(runs):
        shown = {key: row[key] for key in ("configuration", "model", "tokenizer", "runs", "seeds", "scoring")}
        optimistic |= row["scoring"] == OPTIMISTIC
        for key in AVERAGED:
            mean, std = _cell(key, row[f"{key}_mean"]), _cell(key, row[f"{key}_std"])
            shown[key] = f"{mean} ± {std}" if mean and std else mean
        display.append(shown)
    columns = ["configuration", "model", "tokenizer", "runs", "seeds", *AVERAGED, *(["scoring"] if optimistic else [])]
    return markdown_table(display, columns)


def csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()})
    return buffer.getvalue()
