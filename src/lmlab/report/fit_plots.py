"""fit.png: each family's measured runs against training FLOPs, its fitted compute frontier over the
measured budgets (solid) and beyond them (dashed), with the bootstrap band of the curve."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from lmlab.report.fit import LEVEL
from lmlab.report.fit_report import FitAnalysis, frontier, predict
from lmlab.report.plots import _ordered
from lmlab.report.tables import MODEL_ORDER

EXTRAPOLATE = 10.0  # without a prediction asked for, curves run on to 10x the largest budget


def fit_figure(analysis: FitAnalysis) -> Figure:
    """Measured points, fitted curves and extrapolation bands, one colour per family."""
    families = analysis.families
    order = _ordered({f.model for f in families}, MODEL_ORDER)
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    target = analysis.request.predict_flops
    for i, family in enumerate(sorted(families, key=lambda f: (order.index(f.model), f.tokenizer))):
        color = f"C{i % 10}"
        flops = [p.flops for p in family.points]
        ax.scatter(flops, [p.loss for p in family.points], color=color, alpha=0.35, s=14)
        best = frontier(family.points)
        ax.scatter([p.flops for p in best], [p.loss for p in best], color=color, s=40, label=family.name)
        if family.compute is None:
            continue
        low, high = family.measured_flops
        end = max(high * EXTRAPOLATE, target or 0.0)
        measured = np.logspace(math.log10(low), math.log10(high), 50)
        beyond = np.logspace(math.log10(high), math.log10(end), 50)
        ax.plot(measured, family.compute(measured), color=color, linewidth=2)
        ax.plot(beyond, family.compute(beyond), color=color, linewidth=1.5, linestyle="--")
        if family.compute_draws:
            grid = np.concatenate([measured, beyond])
            curves = np.array([draw(grid) for draw in family.compute_draws])
            band = np.quantile(curves, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0)
            ax.fill_between(grid, band[0], band[1], color=color, alpha=0.15, linewidth=0)
        if target is not None:
            p = predict(family, target)
            if p is not None and math.isfinite(p.loss_interval[0]):
                ax.errorbar(
                    [target],
                    [p.loss],
                    yerr=[[p.loss - p.loss_interval[0]], [p.loss_interval[1] - p.loss]],
                    color=color,
                    marker="D",
                    capsize=4,
                )
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs, forward + backward)")
    metric = "test" if analysis.request.metric == "test/bpb" else "validation"
    ax.set_ylabel(f"{metric} bits per byte (lower is better)")
    ax.set_title(
        f"Compute frontiers L(C) = E + A C^-alpha: runs (small), best per budget (large), fit (solid), "
        f"extrapolation (dashed), {LEVEL:.0%} band",
        fontsize="medium",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="model, tokenizer", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
