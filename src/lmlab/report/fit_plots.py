"""fit.png: the fitted laws over the measured runs. Left, where some family spans several budgets:
bits per byte against training FLOPs, each family's runs, its fitted compute frontier over the
measured budgets (solid) and beyond them (dashed), with the bootstrap band of the curve. Right,
where some budget holds three sizes or more: bits per byte against parameters per budget, with the
IsoFLOP parabola and its minimum."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lmlab.report.fit import LEVEL
from lmlab.report.fit_points import frontier
from lmlab.report.fit_report import FamilyFit, FitAnalysis, predict
from lmlab.report.plots import _ordered
from lmlab.report.tables import model_order

EXTRAPOLATE = 10.0  # without a prediction asked for, curves run on to 10x the largest budget


def fit_figure(analysis: FitAnalysis) -> Figure:
    """One panel per kind of fit the runs allow (the compute frontier when none does)."""
    order = _ordered({f.model for f in analysis.families}, model_order())
    families = sorted(analysis.families, key=lambda f: (order.index(f.model), f.tokenizer))
    colors = {f.name: f"C{i % 10}" for i, f in enumerate(families)}
    panels = []
    if any(f.budgets > 1 for f in families) or not any(f.isoflop for f in families):
        panels.append(_frontier_panel)
    if any(f.isoflop for f in families):
        panels.append(_isoflop_panel)
    fig = Figure(figsize=(7 * len(panels) + 2, 5.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    metric = "test" if analysis.request.metric == "test/bpb" else "validation"
    for ax, draw in zip(axes, panels):
        draw(ax, analysis, families, colors)
        ax.set_ylabel(f"{metric} bits per byte (lower is better)")
        ax.grid(alpha=0.3, which="both")
    axes[-1].legend(title="model, tokenizer", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _frontier_panel(ax: Axes, analysis: FitAnalysis, families: list[FamilyFit], colors: dict[str, str]) -> None:
    target = analysis.request.predict_flops
    for family in families:
        color = colors[family.name]
        ax.scatter([p.flops for p in family.points], [p.loss for p in family.points], color=color, alpha=0.35, s=14)
        best = frontier(family.points)
        ax.scatter([p.flops for p in best], [p.loss for p in best], color=color, s=40, label=family.name)
        if family.compute is None:
            continue
        low, high = family.measured_flops
        measured = np.logspace(math.log10(low), math.log10(high), 50)
        beyond = np.logspace(math.log10(high), math.log10(max(high * EXTRAPOLATE, target or 0.0)), 50)
        ax.plot(measured, family.compute(measured), color=color, linewidth=2)
        ax.plot(beyond, family.compute(beyond), color=color, linewidth=1.5, linestyle="--")
        if family.compute_draws:
            grid = np.concatenate([measured, beyond])
            band = np.quantile(
                [draw(grid) for draw in family.compute_draws], [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0
            )
            ax.fill_between(grid, band[0], band[1], color=color, alpha=0.15, linewidth=0)
        prediction = predict(family, target) if target is not None else None
        if prediction is not None and math.isfinite(prediction.loss_interval[0]):
            low_loss, high_loss = prediction.loss_interval
            errors = [[prediction.loss - low_loss], [high_loss - prediction.loss]]
            ax.errorbar([target], [prediction.loss], yerr=errors, color=color, marker="D", capsize=4)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs, forward + backward)")
    ax.set_title(
        f"Compute frontier E + A C^-alpha: runs, best per budget (large), fit,\nextrapolation (dashed), {LEVEL:.0%} band",
        fontsize="medium",
    )


def _isoflop_panel(ax: Axes, analysis: FitAnalysis, families: list[FamilyFit], colors: dict[str, str]) -> None:
    labelled = set()
    for family in families:
        color = colors[family.name]
        for minimum in family.isoflop:
            params = [p.params for p in minimum.points]
            label = None if family.name in labelled else family.name
            labelled.add(family.name)
            ax.scatter(params, [p.loss for p in minimum.points], color=color, s=24, label=label)
            grid = np.logspace(math.log10(min(params)) - 0.15, math.log10(max(params)) + 0.15, 60)
            ax.plot(grid, minimum.parabola(grid), color=color, linewidth=1.5)
            if math.isfinite(minimum.params) and grid[0] <= minimum.params <= grid[-1]:
                ax.scatter([minimum.params], [minimum.parabola(minimum.params)], color=color, marker="*", s=160)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_title("IsoFLOP: a parabola in log N per compute budget, its minimum (star)", fontsize="medium")
