"""The figures of every comparison: learning curves, bits per byte by model and tokenizer, and the
compute frontier (validation bits per byte against training FLOPs).

Runs scored with `<unk>` tokens are labelled "(optimistic)" and drawn hatched or dotted: their
bits per byte leave the unknown words' bytes unpaid."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from pathlib import Path

from matplotlib.figure import Figure

from lmlab.io import atomic_write_bytes
from lmlab.report.runs import Run, read_curve
from lmlab.report.tables import TOKENIZER_ORDER, model_order
from lmlab.report.tuning import choose_learning_rates, tuned

LINESTYLES = ("-", "--", ":", "-.")
PLOT_LABELS = {"test/bpb": "test bits per byte", "val/bpb": "validation bits per byte"}


def _ordered(values: Iterable[str], preferred: tuple[str, ...]) -> list[str]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def learning_curves(runs: Iterable[Run]) -> Figure:
    """Validation bits per byte against training bytes seen, one line per run (colour: model, dash: tokenizer).

    When the runs tune a learning rate, only each group's chosen rate is drawn (its seeds): a grid of
    4 rates x 27 pairs would be 108 lines and a legend no one can read, and the other rates' curves
    are in the runs' own folders and TensorBoard.
    """
    runs = list(runs)
    choices = choose_learning_rates(runs)
    if tuned(choices):
        drawn_runs = [(run, f"{choice.name} (lr {choice.lr:g})") for choice in choices for run in choice.runs]
        title = "Learning curves at each pair's chosen learning rate"
    else:
        drawn_runs = [(run, _shorten(run.label or run.name)) for run in sorted(runs, key=lambda r: r.name)]
        title = "Learning curves"
    colors = {model: f"C{i % 10}" for i, model in enumerate(_ordered((r.model for r in runs), model_order()))}
    dashes = {
        tok: LINESTYLES[i % len(LINESTYLES)]
        for i, tok in enumerate(_ordered((r.tokenizer for r in runs), TOKENIZER_ORDER))
    }
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for run, label in drawn_runs:
        curve = read_curve(run.path)
        if curve:
            ax.plot(
                [p["bytes_seen"] for p in curve],
                [p["val/bpb"] for p in curve],
                marker=".",
                color=colors[run.model],
                linestyle=dashes[run.tokenizer],
                label=label + (" (optimistic)" if run.optimistic else ""),
            )
            drawn += 1
    ax.set_xlabel("training text seen (bytes)")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncols=1 + drawn // 30)
    else:
        ax.text(0.5, 0.5, "no validation points yet (curve.csv)", ha="center", va="center", transform=ax.transAxes)
    return fig


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bpb_by_model(runs: Iterable[Run], metric: str = "test/bpb") -> Figure:
    """Grouped bars: `metric` per model, one bar per tokenizer (error bars: std over seeds), for each pair's
    configuration and learning rate chosen by validation bits per byte (lmlab.report.tuning)."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    optimistic = set()
    for choice in sorted(choose_learning_rates(runs), key=lambda c: c.mean("val/bpb")):
        pair = (choice.model, choice.tokenizer)
        if pair not in best and math.isfinite(choice.mean(metric)):
            best[pair] = (choice.mean(metric), choice.std(metric))
            if choice.optimistic:
                optimistic.add(pair)
    models = _ordered((m for m, _ in best), model_order())
    tokenizers = _ordered((t for _, t in best), TOKENIZER_ORDER)
    fig = Figure(figsize=(max(6.0, 1.6 * len(models) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(tokenizers))
    for j, tokenizer in enumerate(tokenizers):
        present = [(i, best[(model, tokenizer)]) for i, model in enumerate(models) if (model, tokenizer) in best]
        xs = [i - 0.4 + width * (j + 0.5) for i, _ in present]
        errors = [std if math.isfinite(std) else 0.0 for _, (_, std) in present]
        flagged = " (optimistic)" if any(t == tokenizer for _, t in optimistic) else ""
        bars = ax.bar(
            xs,
            [mean for _, (mean, _) in present],
            width,
            label=tokenizer + flagged,
            yerr=errors if any(errors) else None,
            capsize=3,
        )
        for bar, (i, _) in zip(bars, present):
            if (models[i], tokenizer) in optimistic:
                bar.set_hatch("//")
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(range(len(models)), models)
    label = PLOT_LABELS.get(metric, metric)
    ax.set_ylabel(f"{label} (lower is better)")
    ax.set_title(
        f"{label[0].upper()}{label[1:]} by model and tokenizer\n(configuration and learning rate chosen by val bpb)"
    )
    if optimistic:
        ax.text(
            0.0,
            -0.12,
            "hatched: optimistic (scored with <unk>; unknown words' bytes unpaid)",
            transform=ax.transAxes,
            fontsize=7,
        )
    if tokenizers:
        ax.legend(title="tokenizer")
    else:
        ax.text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=ax.transAxes)
    ax.grid(axis="y", alpha=0.3)
    return fig


def frontier(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower envelope of (FLOPs, bpb) points: the best bpb reached at or below each FLOPs, at
    the FLOPs where it improves."""
    envelope: list[tuple[float, float]] = []
    for flops, bpb in sorted(points):
        if math.isfinite(bpb) and (not envelope or bpb < envelope[-1][1]):
            envelope.append((flops, bpb))
    return envelope


def has_flops(runs: Iterable[Run]) -> bool:
    """Whether any run's curve.csv records training FLOPs (runs of lmlab versions before it do not)."""
    return any(point.get("train_flops", 0) > 0 for run in runs for point in read_curve(run.path))


def compute_frontier(runs: Iterable[Run]) -> Figure:
    """Validation bits per byte against training FLOPs: every run's curve (thin) and each architecture's
    compute frontier (thick), the lower envelope of all its runs: the best score reached at each compute.

    Optimistic runs (scored with <unk>) are drawn dotted and left out of the frontiers."""
    runs = list(runs)
    colors = {model: f"C{i % 10}" for i, model in enumerate(_ordered((r.model for r in runs), model_order()))}
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    points: dict[str, list[tuple[float, float]]] = {}
    for run in sorted(runs, key=lambda r: r.name):
        curve = [p for p in read_curve(run.path) if p.get("train_flops", 0) > 0]
        if not curve:
            continue
        xs, ys = [p["train_flops"] for p in curve], [p["val/bpb"] for p in curve]
        ax.plot(xs, ys, color=colors[run.model], alpha=0.3, linewidth=0.8, linestyle=":" if run.optimistic else "-")
        if not run.optimistic:
            points.setdefault(run.model, []).extend(zip(xs, ys))
    for model in _ordered(points, model_order()):
        envelope = frontier(points[model])
        ax.step(*zip(*envelope), where="post", color=colors[model], linewidth=2.2, label=model)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs, forward + backward)")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title("Compute frontier: best validation bits per byte reached at each training compute")
    ax.grid(alpha=0.3, which="both")
    if points:
        ax.legend(title="architecture (frontier)", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no curve.csv with train_flops", ha="center", va="center", transform=ax.transAxes)
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
