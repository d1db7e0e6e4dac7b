"""Scaling-law fits of a sweep's runs, per model family x tokenizer: what `compare.py --fit` prints and
the end of a sweep over sizes or budgets writes into comparison.md.

Each family's points are its completed runs at the learning rate chosen by validation bits per byte
(lmlab.report.tuning), scored on one text; runs scored with `<unk>` are left out (their bits per
byte are optimistic). Every interval comes from refitting on resampled runs, and every family's
largest budget is also held out and predicted from the rest, so the report shows how far its law
can be trusted beyond what was measured.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from lmlab.errors import ConfigError
from lmlab.report.fit import (
    LEVEL,
    MAX_FLOPS,
    ChinchillaLaw,
    ComputeLaw,
    Parabola,
    bootstrap,
    check_flops,
    crossing,
    fit_chinchilla,
    fit_compute_law,
    fit_parabola,
    interval,
)
from lmlab.report.fit_points import (
    Point,
    budget_slices,
    check_same_text,
    family_points,
    frontier,
    spans_sizes_or_budgets,
)
from lmlab.report.runs import Run

METRICS = ("test/bpb", "val/bpb")
RESAMPLES = 200
NOT_PREDICTIVE = 0.05  # bits per byte between a held-out budget's measured and predicted score
SAME_BUDGET = math.log(1.1)
EXACT = "as many points as parameters: the law passes through them exactly, so there is no interval"  # runs whose training FLOPs differ by under 10% share a compute budget


@dataclass(frozen=True)
class FitRequest:
    """What to fit and predict; `only_if_spanning`: skip runs that vary neither size nor budget (the
    end of every sweep asks this way), instead of refusing them."""

    metric: str = "test/bpb"
    predict_flops: float | None = None
    resamples: int = RESAMPLES
    seed: int = 0
    only_if_spanning: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"--fit-metric {self.metric} is not one of {', '.join(METRICS)}")
        if self.resamples < 1:
            raise ConfigError(f"--fit-resamples must be at least 1 (got {self.resamples})")
        if self.predict_flops is not None:
            check_flops(self.predict_flops)


@dataclass(frozen=True)
class HeldOut:
    """The largest budget's best run, predicted by a law fitted to the smaller budgets."""

    law: str
    flops: float
    measured: float
    predicted: float

    @property
    def error(self) -> float:
        return self.predicted - self.measured

    @property
    def predictive(self) -> bool:
        return abs(self.error) <= NOT_PREDICTIVE


@dataclass(frozen=True)
class IsoFlopMinimum:
    """The compute-optimal size of one budget, from the parabola through its sizes."""

    flops: float
    sizes: int
    params: float
    interval: tuple[float, float]
    measured_range: tuple[float, float]
    parabola: Parabola
    points: tuple[Point, ...]


@dataclass
class FamilyFit:
    """Every law fitted to one model x tokenizer, and why each missing one is missing."""

    model: str
    tokenizer: str
    points: list[Point]
    compute: ComputeLaw | None = None
    compute_draws: list[ComputeLaw] = field(default_factory=list)
    chinchilla: ChinchillaLaw | None = None
    chinchilla_draws: list[ChinchillaLaw] = field(default_factory=list)
    isoflop: list[IsoFlopMinimum] = field(default_factory=list)
    held_out: list[HeldOut] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # law -> why it was not fitted

    @property
    def name(self) -> str:
        return f"{self.model}, {self.tokenizer}"

    @property
    def budgets(self) -> int:
        return len(budget_slices(self.points))

    @property
    def flops_per_param_token(self) -> float:
        """k in C = k N D: 6 for the weights, plus the attention or scan share of this family."""
        return statistics.median(p.flops / (p.params * p.tokens) for p in self.points)

    @property
    def measured_flops(self) -> tuple[float, float]:
        return min(p.flops for p in self.points), max(p.flops for p in self.points)


@dataclass(frozen=True)
class Crossing:
    """Where one family's frontier is predicted to cross another's, and how sure the fits are."""

    first: str
    second: str
    flops: float | None
    interval: tuple[float, float]
    share: float  # of paired bootstrap draws that cross below MAX_FLOPS

    @property
    def verdict(self) -> str:
        if self.flops is not None and self.share >= LEVEL:
            low, high = self.interval
            return f"cross at {self.flops:.3g} FLOPs [{low:.3g}, {high:.3g}]"
        if self.flops is None and self.share <= 1 - LEVEL:
            return f"do not cross below {MAX_FLOPS:.0e} FLOPs"
        return f"the fits cannot tell ({self.share:.0%} of resamples cross below {MAX_FLOPS:.0e} FLOPs)"


NO_INTERVAL = (math.nan, math.nan)


@dataclass(frozen=True)
class Prediction:
    """A family's predicted scores at one training compute (NaN from a law not fitted), and the
    compute-optimal size and text."""

    flops: float
    frontier: float = math.nan
    frontier_interval: tuple[float, float] = NO_INTERVAL
    chinchilla: float = math.nan  # the Chinchilla law's score at its optimal N and D
    chinchilla_interval: tuple[float, float] = NO_INTERVAL
    params: float = math.nan
    params_interval: tuple[float, float] = NO_INTERVAL
    tokens: float = math.nan
    tokens_interval: tuple[float, float] = NO_INTERVAL
    note: str = ""

    @property
    def loss(self) -> float:
        """The frontier's score where it was fitted, else the Chinchilla law's."""
        return self.frontier if math.isfinite(self.frontier) else self.chinchilla

    @property
    def loss_interval(self) -> tuple[float, float]:
        return self.frontier_interval if math.isfinite(self.frontier) else self.chinchilla_interval


def predict(family: FamilyFit, flops: float) -> Prediction | None:
    """Each fitted law's score at `flops` with its bootstrap interval, and the compute-optimal N and D
    where a Chinchilla fit exists (None where neither law was fitted)."""
    if family.compute is None and family.chinchilla is None:
        return None
    scores: dict = {}
    if family.compute is not None:
        scores["frontier"] = float(family.compute(flops))
        scores["frontier_interval"] = interval([float(draw(flops)) for draw in family.compute_draws])
    if family.chinchilla is None:
        return Prediction(flops, **scores, note="no Chinchilla fit: compute-optimal N and D unknown")
    k = family.flops_per_param_token
    params, tokens = family.chinchilla.optimal(flops, k)
    draws = [(draw, *draw.optimal(flops, k)) for draw in family.chinchilla_draws]
    return Prediction(
        flops,
        **scores,
        chinchilla=float(family.chinchilla(params, tokens)),
        chinchilla_interval=interval([float(draw(n, d)) for draw, n, d in draws]),
        params=params,
        params_interval=interval([n for _, n, _ in draws]),
        tokens=tokens,
        tokens_interval=interval([d for _, _, d in draws]),
        note=f"N and D from the Chinchilla law, with C = {k:.2f} N D",
    )


@dataclass
class FitAnalysis:
    request: FitRequest
    families: list[FamilyFit]
    crossings: list[Crossing]
    text_note: str


def _fit_family(model: str, tokenizer: str, points: list[Point], request: FitRequest) -> FamilyFit:
    family = FamilyFit(model, tokenizer, points)
    best = frontier(points)
    try:
        family.compute = fit_compute_law(np.array([p.flops for p in best]), np.array([p.loss for p in best]))

        def refit_compute(picks: np.ndarray) -> ComputeLaw:
            resampled = frontier([points[i] for i in picks])
            return fit_compute_law(
                np.array([p.flops for p in resampled]), np.array([p.loss for p in resampled]), family.compute
            )

        family.compute_draws = bootstrap(refit_compute, len(points), _resamples(len(best), 3, request), request.seed)
        if not family.compute_draws:
            family.notes["compute"] = EXACT
    except ConfigError as err:
        family.notes["compute"] = str(err)
    params, tokens, loss = (np.array([getattr(p, key) for p in points]) for key in ("params", "tokens", "loss"))
    try:
        family.chinchilla = fit_chinchilla(params, tokens, loss)
        family.chinchilla_draws = bootstrap(
            lambda picks: fit_chinchilla(params[picks], tokens[picks], loss[picks], family.chinchilla),
            len(points),
            _resamples(len({(p.params, p.tokens) for p in points}), 5, request),
            request.seed,
        )
        if not family.chinchilla_draws:
            family.notes["chinchilla"] = EXACT
    except ConfigError as err:
        family.notes["chinchilla"] = str(err)
    family.isoflop = _isoflop_minima(points, request)
    if not family.isoflop:
        family.notes["isoflop"] = "no compute budget has 3 model sizes or more, as an IsoFLOP parabola needs"
    family.held_out = _held_out(points)
    return family


def _resamples(distinct: int, parameters: int, request: FitRequest) -> int:
    """No bootstrap where the law has as many parameters as distinct points: every resample holding
    them all gives the same exact fit, so the interval would be a point."""
    return request.resamples if distinct > parameters else 0


def _isoflop_minima(points: list[Point], request: FitRequest) -> list[IsoFlopMinimum]:
    minima = []
    for slice_ in budget_slices(points):
        params = np.array([p.params for p in slice_])
        loss = np.array([p.loss for p in slice_])
        try:
            parabola = fit_parabola(params, loss)
        except ConfigError:
            continue
        draws = bootstrap(
            lambda picks, params=params, loss=loss: fit_parabola(params[picks], loss[picks]).optimal_params,
            len(slice_),
            _resamples(len(set(params)), 3, request),
            request.seed,
        )
        flops = statistics.median(p.flops for p in slice_)
        minima.append(
            IsoFlopMinimum(
                flops,
                len(set(params)),
                parabola.optimal_params,
                interval(draws),
                (float(params.min()), float(params.max())),
                parabola,
                tuple(slice_),
            )
        )
    return minima


def _held_out(points: list[Point]) -> list[HeldOut]:
    """The largest budget predicted by each law refitted without it (where the rest still fits)."""
    slices = budget_slices(points)
    if len(slices) < 2:
        return []
    rest = [p for slice_ in slices[:-1] for p in slice_]
    target = min(slices[-1], key=lambda p: p.loss)
    results = []
    try:
        best = frontier(rest)
        law = fit_compute_law(np.array([p.flops for p in best]), np.array([p.loss for p in best]))
        results.append(HeldOut("compute frontier", target.flops, target.loss, float(law(target.flops))))
    except ConfigError:
        pass
    try:
        law = fit_chinchilla(*(np.array([getattr(p, key) for p in rest]) for key in ("params", "tokens", "loss")))
        results.append(HeldOut("Chinchilla", target.flops, target.loss, float(law(target.params, target.tokens))))
    except ConfigError:
        pass
    return results


def _crossings(families: list[FamilyFit]) -> list[Crossing]:
    fitted = [f for f in families if f.compute is not None]
    found = []
    for first, second in combinations(fitted, 2):
        low = min(first.measured_flops[0], second.measured_flops[0])
        point = crossing(first.compute, second.compute, low)
        draws = [crossing(a, b, low) for a, b in zip(first.compute_draws, second.compute_draws)]
        share = sum(d is not None for d in draws) / len(draws) if draws else math.nan
        crossed = interval([d for d in draws if d is not None])
        found.append(Crossing(first.name, second.name, point, crossed, share))
    return found


def analyse(runs: list[Run], request: FitRequest) -> FitAnalysis | None:
    """Every family's fits, held-out checks and crossings; None when `request.only_if_spanning` and
    the runs vary neither size nor budget. Refuses runs on different text, and runs no law fits."""
    if request.only_if_spanning and not spans_sizes_or_budgets(runs):
        return None
    points = family_points(runs, request.metric)
    if not points:
        raise ConfigError(
            f"nothing to fit: no completed run records params, tokens_seen, train_flops and {request.metric} "
            "(runs scored with <unk> are left out)"
        )
    used = {p.run for family in points.values() for p in family}
    text_note = check_same_text([run for run in runs if (run.label or run.name) in used])
    families = [_fit_family(model, tok, pts, request) for (model, tok), pts in sorted(points.items())]
    crossings = _crossings(families)
    if not any(f.compute or f.chinchilla or f.isoflop for f in families):
        reasons = "; ".join(families[0].notes.values())
        raise ConfigError(f"no scaling law fits these runs ({families[0].name}: {reasons})")
    return FitAnalysis(request, families, crossings, text_note)
