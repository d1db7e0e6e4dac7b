"""Scaling laws fitted to measured runs, in bits per byte: the compute frontier, the Chinchilla form and
the IsoFLOP minimum, each with bootstrap draws for its intervals.

- Compute frontier: L(C) = E + A C^-alpha, C the training FLOPs of the best run at each budget.
- Chinchilla (Hoffmann et al. 2022, approach 3): L(N, D) = E + A / N^alpha + B / D^beta, N the
  parameters and D the training tokens.
- IsoFLOP minimum (approach 2): at one training compute, a parabola of L in log N; its vertex is
  the compute-optimal size of that budget.

Both power laws are fitted as approach 3 does: log L is written as a log-sum-exp of its terms
(log E, log A - alpha log C, ...), and the Huber loss (delta 1e-3) of its residuals is minimised by
L-BFGS from the best points of a grid of initialisations. Working in log L keeps every point's
weight alike whatever its loss, and Huber keeps one odd run from pulling the exponents. scipy comes
with the optuna sweeper lmlab depends on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from typing import TypeVar

import numpy as np
from scipy.optimize import brentq, minimize
from threadpoolctl import threadpool_limits

from lmlab.errors import ConfigError

HUBER_DELTA = 1e-3
# Initial values: log E, then for each power term its log coefficient and exponent (approach 3's grid,
# with log E around bits per byte of 0.4 to 4.5).
GRID_LOG_E = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
GRID_LOG_COEF = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
GRID_EXPONENT = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
STARTS = 8  # L-BFGS runs from the best grid points
EXPONENT_BOUNDS = (0.0, 3.0)  # a loss that grows with scale is not a scaling law
LOG_E_BOUNDS = (-10.0, 5.0)
LOG_COEF_BOUNDS = (-20.0, 80.0)
# The Huber loss of residuals near 1e-3 is near 1e-7: scipy's default tolerances would stop short of it.
TOLERANCES = {"ftol": 1e-14, "gtol": 1e-12, "maxiter": 2000}
MAX_FLOPS = 1e30  # beyond any training run made so far by four orders of magnitude
LEVEL = 0.95

T = TypeVar("T")


def _huber(residuals: np.ndarray) -> np.ndarray:
    small = np.abs(residuals) <= HUBER_DELTA
    return np.where(small, 0.5 * residuals**2, HUBER_DELTA * (np.abs(residuals) - 0.5 * HUBER_DELTA))


def logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(values))) along `axis` without overflow (scipy's checks cost more than the sum here)."""
    top = values.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.exp(values - top).sum(axis=axis))


def _log_prediction(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log L for parameters theta = (log E, c_1, p_1, c_2, p_2, ...) at log scales x (terms x points)."""
    terms = theta[..., 1::2, None] - theta[..., 2::2, None] * x
    constant = np.broadcast_to(theta[..., :1, None], (*terms.shape[:-2], 1, x.shape[-1]))
    return logsumexp(np.concatenate([constant, terms], axis=-2), axis=-2)


def _objective(theta: np.ndarray, x: np.ndarray, log_loss: np.ndarray) -> tuple[float, np.ndarray]:
    """The summed Huber loss of the log residuals, and its gradient in theta."""
    terms = np.vstack([np.full(x.shape[1], theta[0]), theta[1::2, None] - theta[2::2, None] * x])
    log_pred = logsumexp(terms, axis=0)
    weights = np.exp(terms - log_pred)  # d log_pred / d term
    residual = log_pred - log_loss
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)  # Huber's derivative
    grad = np.empty_like(theta)
    grad[0] = slope @ weights[0]
    grad[1::2] = weights[1:] @ slope
    grad[2::2] = -(weights[1:] * x) @ slope
    return float(_huber(residual).sum()), grad


def fit_log_sum_exp(x: np.ndarray, loss: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """theta minimising the Huber loss of log L against log-sum-exp(log E, c_j - p_j x_j).

    Every point of the initial grid is scored at once, and L-BFGS runs from the STARTS best of them,
    keeping the lowest loss it reaches; a bootstrap resample starts from `start` alone, the full
    data's optimum, which lies near its own.
    """
    log_loss = np.log(loss)
    terms = x.shape[0]
    if start is None:
        grid = np.array(
            [
                [e, *chain]
                for e in GRID_LOG_E
                for pairs in product(product(GRID_LOG_COEF, GRID_EXPONENT), repeat=terms)
                for chain in [[v for pair in pairs for v in pair]]
            ]
        )
        scores = _huber(_log_prediction(grid, x) - log_loss).sum(axis=-1)
        starts = list(grid[np.argsort(scores)[:STARTS]])
    else:
        starts = [start]
    bounds = [LOG_E_BOUNDS] + [LOG_COEF_BOUNDS, EXPONENT_BOUNDS] * terms
    best = None
    with threadpool_limits(1):  # BLAS threads slow such tiny problems down many times over on a busy machine
        for theta0 in starts:
            result = minimize(
                _objective, theta0, args=(x, log_loss), jac=True, method="L-BFGS-B", bounds=bounds, options=TOLERANCES
            )
            if best is None or result.fun < best.fun:
                best = result
    return best.x


def _positive(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values) & (values > 0)):
        bad = values[~(np.isfinite(values) & (values > 0))]
        raise ConfigError(f"cannot fit {name} that are not positive and finite (e.g. {bad[0]:g})")
    return values


def _enough(points: int, parameters: int, law: str, unit: str) -> None:
    """Refuse a fit on one point, or on fewer points than the law has parameters."""
    if points <= 1:
        raise ConfigError(f"cannot fit {law} to one {unit}: sweep several")
    if points < parameters:
        raise ConfigError(
            f"cannot fit {law} ({parameters} parameters) to {points} {unit}s: sweep at least {parameters}"
        )


@dataclass(frozen=True)
class ComputeLaw:
    """The compute frontier L(C) = E + A C^-alpha, in bits per byte."""

    E: float
    A: float
    alpha: float

    def __call__(self, flops: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A * np.power(flops, -self.alpha)

    @property
    def theta(self) -> np.ndarray:
        return np.array([math.log(self.E), math.log(self.A), self.alpha])


def fit_compute_law(flops: np.ndarray, loss: np.ndarray, start: ComputeLaw | None = None) -> ComputeLaw:
    """The frontier through (training FLOPs, best bits per byte) points, one per compute budget."""
    flops, loss = _positive("FLOPs", flops), _positive("bits per byte", loss)
    _enough(len(np.unique(flops)), 3, "the compute frontier E + A C^-alpha", "compute budget")
    theta = fit_log_sum_exp(np.log(flops)[None, :], loss, None if start is None else start.theta)
    return ComputeLaw(math.exp(theta[0]), math.exp(theta[1]), float(theta[2]))


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, in bits per byte (N parameters, D training tokens)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def __call__(self, params: float | np.ndarray, tokens: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A * np.power(params, -self.alpha) + self.B * np.power(tokens, -self.beta)

    @property
    def theta(self) -> np.ndarray:
        return np.array([math.log(self.E), math.log(self.A), self.alpha, math.log(self.B), self.beta])

    def optimal(self, flops: float, flops_per_param_token: float) -> tuple[float, float]:
        """The (N, D) of least loss at `flops` = k N D (k: the family's FLOPs per parameter and token,
        6 plus its attention or scan share), minimising A N^-alpha + B D^-beta on that curve."""
        if self.alpha <= 0 or self.beta <= 0:
            return math.nan, math.nan
        budget = flops / flops_per_param_token  # N * D
        scale = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        params = scale * budget ** (self.beta / (self.alpha + self.beta))
        return params, budget / params


def fit_chinchilla(
    params: np.ndarray, tokens: np.ndarray, loss: np.ndarray, start: ChinchillaLaw | None = None
) -> ChinchillaLaw:
    """Approach 3's fit; refused unless N and D vary apart (runs on one line of log N, log D, such as
    one IsoFLOP slice, cannot tell the N term from the D term)."""
    params, tokens = _positive("parameter counts", params), _positive("token counts", tokens)
    loss = _positive("bits per byte", loss)
    distinct = len({(n, d) for n, d in zip(params, tokens)})
    _enough(distinct, 5, "the Chinchilla law E + A/N^alpha + B/D^beta", "(N, D) pair")
    design = np.column_stack([np.ones_like(params), np.log(params), np.log(tokens)])
    if np.linalg.matrix_rank(design, tol=1e-6 * np.abs(design).max()) < 3:
        raise ConfigError(
            "cannot fit the Chinchilla law: the runs' sizes and token counts move together (one compute "
            "budget, or one model size); sweep several sizes at several budgets"
        )
    theta = fit_log_sum_exp(np.log(np.vstack([params, tokens])), loss, None if start is None else start.theta)
    return ChinchillaLaw(*(math.exp(theta[0]), math.exp(theta[1]), theta[2], math.exp(theta[3]), theta[4]))


@dataclass(frozen=True)
class Parabola:
    """L = a (log N)^2 + b log N + c over one IsoFLOP slice."""

    a: float
    b: float
    c: float

    @property
    def optimal_params(self) -> float:
        """The vertex's N; NaN where the parabola opens downward (no minimum)."""
        return math.exp(-self.b / (2 * self.a)) if self.a > 0 else math.nan

    def __call__(self, params: float | np.ndarray) -> float | np.ndarray:
        log_n = np.log(params)
        return self.a * log_n**2 + self.b * log_n + self.c


def fit_parabola(params: np.ndarray, loss: np.ndarray) -> Parabola:
    """Approach 2: least squares of L on log N and its square, for runs of one training compute."""
    params, loss = _positive("parameter counts", params), _positive("bits per byte", loss)
    _enough(len(np.unique(params)), 3, "an IsoFLOP parabola", "model size")
    a, b, c = np.polyfit(np.log(params), loss, 2)
    return Parabola(float(a), float(b), float(c))


def bootstrap(fit: Callable[[np.ndarray], T], size: int, resamples: int, seed: int = 0) -> list[T]:
    """`fit` of `resamples` resamples (with replacement) of `size` points' indices; resamples the law
    cannot be fitted to (too few distinct points drawn) are left out."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        try:
            draws.append(fit(rng.integers(0, size, size)))
        except ConfigError:
            continue
    return draws


def interval(values: list[float] | np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` percentile interval of finite bootstrap values (NaN, NaN if none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def check_flops(flops: float) -> float:
    """A compute to predict at: positive, finite and at most MAX_FLOPS, else one line."""
    if not (math.isfinite(flops) and 0 < flops <= MAX_FLOPS):
        raise ConfigError(
            f"--predict-flops {flops:g} is not a training compute: give a positive number of FLOPs up to {MAX_FLOPS:g}"
        )
    return float(flops)


def crossing(first: ComputeLaw, second: ComputeLaw, low: float, high: float = MAX_FLOPS) -> float | None:
    """The smallest compute in [low, high] where the two frontiers meet, or None if they do not."""
    grid = np.logspace(math.log10(low), math.log10(high), 400)
    gap = first(grid) - second(grid)
    changes = np.nonzero(np.sign(gap[:-1]) != np.sign(gap[1:]))[0]
    if not len(changes):
        return None
    i = changes[0]
    root = brentq(lambda log_c: first(10**log_c) - second(10**log_c), math.log10(grid[i]), math.log10(grid[i + 1]))
    return float(10**root)
