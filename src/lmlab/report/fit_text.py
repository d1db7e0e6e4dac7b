"""The scaling-law section of a report, in Markdown: fitted laws, held-out checks, predictions and
crossings (lmlab.report.fit_report computes them)."""

from __future__ import annotations

import math

from lmlab.report.fit import LEVEL, interval
from lmlab.report.fit_report import NOT_PREDICTIVE, FitAnalysis, FitRequest, IsoFlopMinimum, predict
from lmlab.report.tables import markdown_table

FIGURE = "fit.png"
FLOOR_UNSEEN = 1e-3  # bits per byte: a fitted E below this sits at its bound (log E >= -10)
ROUGH_BELOW = 6  # IsoFLOP slices of fewer sizes give bootstrap intervals from a handful of distinct resamples


def _with_interval(value: float, bounds: tuple[float, float], fmt: str) -> str:
    if not math.isfinite(value):
        return ""
    low, high = bounds
    text = format(value, fmt)
    return f"{text} [{low:{fmt}}, {high:{fmt}}]" if math.isfinite(low) else text


def _range(low: float, high: float) -> str:
    low_text, high_text = f"{low:.3g}", f"{high:.3g}"
    return low_text if low_text == high_text else f"{low_text} to {high_text}"


def fit_markdown(analysis: FitAnalysis, heading: str = "##") -> str:
    """The section: one table per law, the held-out check, the prediction asked for and crossings."""
    request, families = analysis.request, analysis.families
    metric = "test" if request.metric == "test/bpb" else "validation"
    level = f"{LEVEL:.0%}"
    parts = [
        f"{heading} Scaling-law fits",
        "",
        f"Fitted per model x tokenizer to the {metric} bits per byte of its completed runs at the learning rate "
        "chosen by validation (runs scored with `<unk>` left out). Brackets: "
        f"{level} bootstrap intervals from {request.resamples} refits on resampled runs. {analysis.text_note} "
        "docs/comparisons.md (Beyond the measured budget) says how each law is fitted.",
        "",
        f"{heading}# Compute frontier: L(C) = E + A C^-alpha",
        "",
        "C: training FLOPs; L: the best run of each compute budget.",
        "",
    ]
    rows = []
    for f in families:
        law = f.compute
        alpha = (
            _with_interval(law.alpha, interval([d.alpha for d in f.compute_draws]), ".3f") if law is not None else ""
        )
        rows.append(
            {
                "family": f.name,
                "budgets": f.budgets,
                "FLOPs": _range(*f.measured_flops),
                "E": f"{law.E:.3f}" if law else "",
                "A": f"{law.A:.3g}" if law else "",
                "alpha": alpha,
                "note": _joined(f.notes.get("compute", ""), _floor_note(law.E) if law else ""),
            }
        )
    parts += [markdown_table(rows, ["family", "budgets", "FLOPs", "E", "A", "alpha", "note"]), ""]
    chinchilla = [f for f in families if f.chinchilla is not None]
    parts += [f"{heading}# Chinchilla: L(N, D) = E + A / N^alpha + B / D^beta", ""]
    if chinchilla:
        rows = [
            {
                "family": f.name,
                "fitted runs": len(f.points),
                "E": f"{f.chinchilla.E:.3f}",
                "alpha": _with_interval(f.chinchilla.alpha, interval([d.alpha for d in f.chinchilla_draws]), ".3f"),
                "beta": _with_interval(f.chinchilla.beta, interval([d.beta for d in f.chinchilla_draws]), ".3f"),
                "note": _joined(f.notes.get("chinchilla", ""), _floor_note(f.chinchilla.E)),
            }
            for f in chinchilla
        ]
        parts += [
            "N: parameters; D: training tokens.",
            "",
            markdown_table(rows, ["family", "fitted runs", "E", "alpha", "beta", "note"]),
            "",
        ]
    skipped = [f for f in families if f.chinchilla is None]
    if skipped:
        reasons = {f.notes.get("chinchilla", "") for f in skipped}
        if len(reasons) == 1:
            parts += [f"Not fitted for {'; '.join(f.name for f in skipped)}: {reasons.pop()}.", ""]
        else:
            parts += [*(f"- Not fitted for {f.name}: {f.notes.get('chinchilla', '')}." for f in skipped), ""]
    minima = [(f, m) for f in families for m in f.isoflop]
    if minima:
        rows = [
            {
                "family": f.name,
                "FLOPs": f"{m.flops:.3g}",
                "sizes": m.sizes,
                "measured N": _range(*m.measured_range),
                "optimal N": _with_interval(m.params, m.interval, ".3g")
                if math.isfinite(m.params)
                else "none: the parabola opens downward",
                "note": _isoflop_note(m),
            }
            for f, m in minima
        ]
        parts += [
            f"{heading}# IsoFLOP minima: a parabola in log N per compute budget",
            "",
            markdown_table(rows, ["family", "FLOPs", "sizes", "measured N", "optimal N", "note"]),
            "",
        ]
    held = [(f, h) for f in families for h in f.held_out]
    parts += [f"{heading}# Held out: each family's largest budget, predicted from the smaller ones", ""]
    if held:
        rows = [
            {
                "family": f.name,
                "law": h.law,
                "FLOPs": f"{h.flops:.3g}",
                "measured": f"{h.measured:.4f}",
                "predicted": f"{h.predicted:.4f}",
                "error": f"{h.error:+.4f}",
                "verdict": "" if h.predictive else "not predictive",
            }
            for f, h in held
        ]
        parts += [
            f"A law whose prediction misses the measured best run by more than {NOT_PREDICTIVE} bits per byte is "
            "marked not predictive: do not trust it beyond the measured budgets.",
            "",
            markdown_table(rows, ["family", "law", "FLOPs", "measured", "predicted", "error", "verdict"]),
            "",
        ]
    else:
        parts += ["No family has enough budgets to fit a law without its largest one.", ""]
    if request.predict_flops is not None:
        parts += _prediction_text(analysis, request, heading)
    if analysis.crossings:
        parts += [
            f"{heading}# Where frontiers cross",
            "",
            "The compute at which one family's fitted frontier meets another's, with the interval over the "
            "resamples that cross; where too many resamples disagree, the fits cannot tell.",
            "",
            *(f"- {c.first} and {c.second}: {c.verdict}" for c in analysis.crossings),
            "",
        ]
    parts += [f"![scaling-law fits]({FIGURE})", ""]
    return "\n".join(parts)


def _joined(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def _floor_note(floor: float) -> str:
    """A fitted E near zero: the runs never show the loss levelling off, so E is not measured."""
    return "E at its lower bound: the runs do not show where the loss levels off" if floor < FLOOR_UNSEEN else ""


def _isoflop_note(minimum: IsoFlopMinimum) -> str:
    notes = []
    if math.isfinite(minimum.params) and not minimum.measured_range[0] <= minimum.params <= minimum.measured_range[1]:
        notes.append("outside the measured sizes: extrapolated")
    if minimum.sizes == 3:
        notes.append("3 sizes fix the parabola: no interval")
    elif minimum.sizes < ROUGH_BELOW:
        notes.append(f"{minimum.sizes} sizes: resamples keep 3 or more of them, a rough interval")
    return "; ".join(notes)


def _prediction_text(analysis: FitAnalysis, request: FitRequest, heading: str) -> list[str]:
    flops = request.predict_flops
    rows = []
    for f in analysis.families:
        p = predict(f, flops)
        if p is None:
            rows.append({"family": f.name, "note": "no compute frontier or Chinchilla law fitted: nothing to predict"})
            continue
        factor = flops / f.measured_flops[1]
        rows.append(
            {
                "family": f.name,
                "bpb (frontier)": _with_interval(p.frontier, p.frontier_interval, ".3f"),
                "bpb (Chinchilla)": _with_interval(p.chinchilla, p.chinchilla_interval, ".3f"),
                "N": _with_interval(p.params, p.params_interval, ".3g"),
                "D": _with_interval(p.tokens, p.tokens_interval, ".3g"),
                "note": "; ".join(
                    part
                    for part in (
                        p.note,
                        f"{factor:.3g}x the largest measured compute" if factor > 1 else "",
                    )
                    if part
                ),
            }
        )
    parts = [
        f"{heading}# Predicted at {flops:.3g} training FLOPs",
        "",
        markdown_table(rows, ["family", "bpb (frontier)", "bpb (Chinchilla)", "N", "D", "note"]),
        "",
    ]
    return parts
