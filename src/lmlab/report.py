"""Sweep reports: the table and plots that answer "which model and tokenizer did best?".

A report reads only what every run leaves in its directory (metrics.json, config.yaml, curve.csv),
so it works on a finished sweep, on one still running, or on any hand-picked set of run
directories, and never trains anything. The multirun callback (lmlab.sweep_callback),
`python compare.py` and notebooks/compare.ipynb all draw their tables and plots from here.

Runs are ranked by test bits per byte: unlike loss or perplexity per token it does not depend on
the tokenizer, so char, word and BPE runs sit on one scale. Runs whose configs differ only in the
seed are repeats of one configuration and are also summarised as mean ± standard deviation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from lmlab.errors import ConfigError
from lmlab.io import atomic_write_bytes, atomic_write_text

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
DECIMALS = {
    "val/loss": 4,
    "test/loss": 4,
    "val/bpb": 4,
    "test/bpb": 4,
    "val/ppl": 2,
    "test/ppl": 2,
    "wall_time_s": 1,
    "test/unk_rate": 4,
}
NUMERIC = {"seed", "params", "tokens_seen", "bytes_seen", "wall_time_s", *SCORES, "test/unk_rate", "best_step"}
LINESTYLES = ("-", "--", ":", "-.")
PLOT_LABELS = {"test/bpb": "test bits per byte", "val/bpb": "validation bits per byte"}


@dataclass(frozen=True)
class Run:
    """One run directory as a report sees it."""

    name: str  # its path under the directory given, e.g. "model=gpt,tokenizer=bpe"
    path: Path
    metrics: dict[str, Any]
    seed: int | None
    config_key: str  # equal for runs whose configs differ at most in the seed
    label: str = ""  # the name without the settings every run of the report shares (see find_runs)

    @property
    def status(self) -> str:
        return self.metrics.get("status", "incomplete")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def model(self) -> str:
        return str(self.metrics.get("model", "?"))

    @property
    def tokenizer(self) -> str:
        return str(self.metrics.get("tokenizer", "?"))

    @property
    def configuration(self) -> str:
        """The run's label without its seed: what its repeats have in common."""
        parts = [part for part in (self.label or self.name).split(",") if not part.startswith("seed=")]
        return ",".join(parts) or f"{self.model},{self.tokenizer}"

    def score(self, key: str) -> float:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) else math.nan


@dataclass(frozen=True)
class Report:
    """What write_report wrote, and from which runs."""

    runs: list[Run]
    markdown: str
    files: list[Path]


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run under the given sweep or run directories: any folder holding metrics.json or config.yaml.

    A folder with config.yaml but no metrics.json is a run that is still going or was killed; it is
    reported as "incomplete". Hydra names a sweep's run folders by all of their command-line
    settings; labels drop those every run shares (data.path=..., trainer.max_steps=...), which say
    nothing about how the runs differ.
    """
    roots = [Path(p).expanduser() for p in paths]
    for root in roots:
        if not root.is_dir():
            raise ConfigError(
                f"{root} is not a directory: pass sweep directories (outputs/multirun/<time>) "
                "or run directories (outputs/runs/<run>)"
            )
    found = []  # (the sweep it belongs to, when several are compared; its path under it; its directory)
    for root in roots:
        prefix = f"{root.resolve().name}/" if len(roots) > 1 else ""
        for run_dir in _run_dirs(root):
            relative = run_dir.relative_to(root).as_posix()
            found.append(("", run_dir.name, run_dir) if relative == "." else (prefix, relative, run_dir))
    if not found:
        raise ConfigError(
            f"no runs under {', '.join(map(str, roots))}: a run directory holds metrics.json or "
            "config.yaml; pass a sweep directory (outputs/multirun/<time>) or run directories"
        )
    settings = [name.split(",") for _, name, _ in found]
    shared = set.intersection(*map(set, settings)) if len(found) > 1 else set()
    return [
        replace(
            load_run(run_dir, prefix + name), label=prefix + (",".join(s for s in parts if s not in shared) or name)
        )
        for (prefix, name, run_dir), parts in zip(found, settings)
    ]


def _run_dirs(root: Path) -> list[Path]:
    files = (path for name in ("metrics.json", "config.yaml") for path in root.rglob(name))
    # .hydra/config.yaml is Hydra's copy of the config, not a run
    return sorted({path.parent for path in files if not any(p.startswith(".") for p in path.relative_to(root).parts)})


def load_run(run_dir: Path, name: str | None = None) -> Run:
    """A run from its directory; missing or unreadable metrics make it "incomplete", never an error."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError:
        metrics = {"status": "incomplete"}
    except (OSError, json.JSONDecodeError) as err:
        metrics = {"status": "incomplete", "error": f"unreadable metrics.json: {err}"}
    config = _read_config(run_dir)
    names = config.get("names") or {}
    for key in ("model", "tokenizer"):
        metrics.setdefault(key, names.get(key, "?"))
    name = name or run_dir.name
    return Run(
        name=name,
        path=run_dir,
        metrics=metrics,
        seed=config.get("seed"),
        config_key=_config_key(config) if config else f"name:{name}",
    )


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _config_key(config: dict[str, Any]) -> str:
    """A digest of the config without the seed and without the run's own directory, which every run has its own of."""
    rest = {key: value for key, value in config.items() if key not in ("seed", "paths")}
    text = json.dumps(rest, sort_keys=True, default=str)
    output_dir = str((config.get("paths") or {}).get("output_dir") or "")
    if output_dir:
        text = text.replace(output_dir, "<run dir>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    """The run's validation points (curve.csv, written by lmlab.callbacks.ValidationCurve) in step order.

    A line cut short by a crash is skipped; a step written twice (a resumed run) keeps its last values.
    """
    points: dict[int, dict[str, float]] = {}
    try:
        with (run_dir / "curve.csv").open(newline="") as f:
            for row in csv.DictReader(f):
                try:
                    point = {key: float(value) for key, value in row.items() if key}
                except (TypeError, ValueError):
                    continue
                if {"step", "bytes_seen", "val/bpb"} <= point.keys():
                    points[int(point["step"])] = point
    except FileNotFoundError:
        return []
    return [points[step] for step in sorted(points)]


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


def repeated(runs: Iterable[Run]) -> bool:
    """Whether any configuration ran more than once (a sweep over seed=)."""
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        counts[run.config_key] += 1
    return any(count > 1 for count in counts.values())


def configurations(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs grouped by configuration (all settings but the seed)."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.config_key].append(run)
    return dict(groups)


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


def _format(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float) and key in DECIMALS:
        return f"{value:.{DECIMALS[key]}f}"
    if isinstance(value, (int, float)) and key in ("params", "tokens_seen", "bytes_seen"):
        return f"{round(value):,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]], columns: Iterable[str]) -> str:
    columns = list(columns)
    lines = [
        "| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
        "|" + "|".join("---:" if c in NUMERIC else "---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_format(c, row.get(c)) for c in columns) + " |" for row in rows]
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
            mean, std = _format(key, row[f"{key}_mean"]), _format(key, row[f"{key}_std"])
            shown[key] = f"{mean} ± {std}" if mean and std else mean
        display.append(shown)
    return markdown_table(display, ["configuration", "model", "tokenizer", "runs", "seeds", *AVERAGED])


def _ordered(values: Iterable[str], preferred: tuple[str, ...]) -> list[str]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def learning_curves(runs: Iterable[Run]) -> Figure:
    """Validation bits per byte against training bytes seen, one line per run (colour: model, dash: tokenizer)."""
    runs = list(runs)
    colors = {model: f"C{i % 10}" for i, model in enumerate(_ordered((r.model for r in runs), MODEL_ORDER))}
    dashes = {
        tok: LINESTYLES[i % len(LINESTYLES)]
        for i, tok in enumerate(_ordered((r.tokenizer for r in runs), TOKENIZER_ORDER))
    }
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for run in sorted(runs, key=lambda r: r.name):
        curve = read_curve(run.path)
        if curve:
            ax.plot(
                [p["bytes_seen"] for p in curve],
                [p["val/bpb"] for p in curve],
                marker=".",
                color=colors[run.model],
                linestyle=dashes[run.tokenizer],
                label=_shorten(run.label or run.name),
            )
            drawn += 1
    ax.set_xlabel("training text seen (bytes)")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no validation points yet (curve.csv)", ha="center", va="center", transform=ax.transAxes)
    return fig


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def best_per_pair(runs: Iterable[Run], metric: str = "test/bpb") -> dict[tuple[str, str], tuple[float, float]]:
    """(mean, std) of `metric` of the best configuration of each (model, tokenizer) pair."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for members in configurations(runs).values():
        mean, std = _mean_std([run.score(metric) for run in members if run.completed])
        pair = (members[0].model, members[0].tokenizer)
        if math.isfinite(mean) and (pair not in best or mean < best[pair][0]):
            best[pair] = (mean, std)
    return best


def bpb_by_model(runs: Iterable[Run], metric: str = "test/bpb") -> Figure:
    """Grouped bars: `metric` per model, one bar per tokenizer (error bars: std over seeds)."""
    best = best_per_pair(runs, metric)
    models = _ordered((m for m, _ in best), MODEL_ORDER)
    tokenizers = _ordered((t for _, t in best), TOKENIZER_ORDER)
    fig = Figure(figsize=(max(6.0, 1.6 * len(models) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(tokenizers))
    for j, tokenizer in enumerate(tokenizers):
        present = [(i, best[(model, tokenizer)]) for i, model in enumerate(models) if (model, tokenizer) in best]
        xs = [i - 0.4 + width * (j + 0.5) for i, _ in present]
        errors = [std if math.isfinite(std) else 0.0 for _, (_, std) in present]
        bars = ax.bar(
            xs,
            [mean for _, (mean, _) in present],
            width,
            label=tokenizer,
            yerr=errors if any(errors) else None,
            capsize=3,
        )
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(range(len(models)), models)
    label = PLOT_LABELS.get(metric, metric)
    ax.set_ylabel(f"{label} (lower is better)")
    ax.set_title(f"{label[0].upper()}{label[1:]} by model and tokenizer (best configuration of each pair)")
    if tokenizers:
        ax.legend(title="tokenizer")
    else:
        ax.text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=ax.transAxes)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()})
    return buffer.getvalue()


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
    files = {"comparison.csv": _csv_text(run_rows(runs), list(RUN_COLUMNS))}
    if repeated(runs):
        columns = [
            "configuration",
            "model",
            "tokenizer",
            "runs",
            "seeds",
            *(f"{key}_{stat}" for key in AVERAGED for stat in ("mean", "std")),
        ]
        files["comparison_by_configuration.csv"] = _csv_text(group_rows(runs), columns)
    title = "Comparison of " + ", ".join(p.name or str(p) for p in paths)
    files["comparison.md"] = markdown_report(runs, title)
    written = []
    for name, text in files.items():
        atomic_write_text(out / name, text)
        written.append(out / name)
    for name, figure in (("learning_curves.png", learning_curves(runs)), ("bpb_by_model.png", bpb_by_model(runs))):
        _save(figure, out / name)
        written.append(out / name)
    return Report(runs=runs, markdown=files["comparison.md"], files=written)
