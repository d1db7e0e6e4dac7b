"""Parameter-matched sizes: the shape that brings any architecture closest to `budget.target_params`.

Comparing a 2-layer LSTM with a 3-layer GPT at the same `d_model` compares models of very different
sizes. `budget.target_params=N` keeps every setting it can and picks the width `d_model` whose exact
parameter count is nearest to N. When no width of the configured shape comes within 10% (small
targets, where one width step of n_head channels is a large change, or a large vocabulary), fewer
heads (finer width steps) and then other depths are tried; if nothing comes within 10% the run is
refused, naming the closest count the architecture can reach.

The vocabulary (and so the embedding's share) is only known once the tokenizer is trained, which is
why the run's plan (lmlab.run.plan) settles the shape after the data is prepared, before the model is built. Counting builds the model on PyTorch's meta device:
exact, free of memory, and without a second copy of each architecture's parameter formula.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from lmlab.errors import ConfigError
from lmlab.models import count_parameters
from lmlab.run.build import build

log = logging.getLogger(__name__)

TOLERANCE = 0.10  # how far from the target a matched size may land
MAX_WIDTH_STEPS = 1 << 16  # widths are searched up to 65,536 x the width step


@dataclass(frozen=True)
class Match:
    """A model shape and its exact parameter count."""

    settings: dict[str, int]
    params: int

    def off(self, target: int) -> float:
        return self.params / target - 1


def parameters_with(model_cfg: DictConfig, vocab_size: int, settings: dict[str, int]) -> int:
    """The exact parameter count of `model_cfg` built with `settings` overriding its own."""
    with torch.device("meta"):
        model = build(model_cfg.copy(), "model", vocab_size=vocab_size, **settings)
    return count_parameters(model)


def _width_settings(model_cfg: DictConfig, d_model: int, shape: dict[str, int]) -> dict[str, int]:
    """`shape` plus d_model, with d_ff kept at the configured d_ff/d_model ratio where the model has one."""
    settings = {**shape, "d_model": d_model}
    if model_cfg.get("d_ff") is not None:
        settings["d_ff"] = max(1, round(model_cfg.d_ff / model_cfg.d_model * d_model))
    return settings


def match_width(
    model_cfg: DictConfig, vocab_size: int, target_params: int, shape: dict[str, int] | None = None
) -> tuple[int, int]:
    """(d_model, parameters) of the width closest to `target_params`; widths stay multiples of n_head.

    Parameters grow with width, so a doubling search brackets the target and a bisection finds the
    first width at or above it; the answer is that width or the one just below.
    """
    shape = shape or {}
    step = int(shape.get("n_head") or model_cfg.get("n_head") or 1)
    count: dict[int, int] = {}

    def params(k: int) -> int:
        if k not in count:
            count[k] = parameters_with(model_cfg, vocab_size, _width_settings(model_cfg, k * step, shape))
        return count[k]

    high = 1
    while params(high) < target_params and high < MAX_WIDTH_STEPS:
        high *= 2
    low = high // 2  # params(low) < target, unless high is 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if params(middle) < target_params else (low, middle)
    best = min((k for k in (low, high) if k >= 1), key=lambda k: abs(params(k) - target_params))
    return best * step, params(best)


def _shapes(model_cfg: DictConfig) -> Iterator[dict[str, int]]:
    """The configured depth and heads first, then fewer heads (finer width steps), then other depths."""
    n_layer, n_head, n_kv_head = model_cfg.get("n_layer"), model_cfg.get("n_head"), model_cfg.get("n_kv_head")
    heads = [n_head] + [h for h in (2, 1) if h < n_head] if n_head else [None]
    depths = [n_layer]
    if n_layer:
        depths += sorted((d for d in range(1, 2 * n_layer + 1) if d != n_layer), key=lambda d: (abs(d - n_layer), d))
    for depth in depths:
        for head in heads:
            shape = {} if depth is None else {"n_layer": depth}
            if head is not None:
                shape["n_head"] = head
                if n_kv_head:  # the most key/value heads that still divide the query heads
                    shape["n_kv_head"] = max(k for k in range(1, min(n_kv_head, head) + 1) if head % k == 0)
            yield shape


def match_params(model_cfg: DictConfig, vocab_size: int, target: int) -> Match:
    """The shape nearest to the configured one whose size is within TOLERANCE of `target`."""
    closest: Match | None = None
    for shape in _shapes(model_cfg):
        try:
            d_model, params = match_width(model_cfg, vocab_size, target, shape)
        except ConfigError:  # a depth or head count this architecture refuses (e.g. jamba's attention period)
            continue
        match = Match(_width_settings(model_cfg, d_model, shape), params)
        if abs(match.off(target)) <= TOLERANCE:
            return match
        if closest is None or abs(match.off(target)) < abs(closest.off(target)):
            closest = match
    shown = ", ".join(f"{key}={value}" for key, value in closest.settings.items()) if closest else "none"
    raise ConfigError(
        f"budget.target_params={target:,} is out of reach for this model with a {vocab_size:,}-token vocabulary: "
        f"the closest is {closest.params if closest else 0:,} parameters ({shown}); "
        "set budget.target_params nearer to it, or use a smaller vocabulary"
    )


def target_shape(model_cfg: DictConfig, vocab_size: int, target: int | None) -> dict[str, int]:
    """The model settings (d_model, and d_ff, depth or heads where needed) that match `target`
    (budget.target_params) parameters; none when the run is not parameter-matched."""
    if target is None:
        return {}
    if int(target) < 1:
        raise ConfigError(f"budget.target_params must be a positive number of parameters (got {target})")
    if model_cfg.get("d_model") is None:
        raise ConfigError("budget.target_params needs a model with a d_model width: remove budget.target_params")
    match = match_params(model_cfg, vocab_size, int(target))
    shown = ", ".join(f"{key}={value}" for key, value in match.settings.items())
    log.info(
        f"budget.target_params={int(target):,}: {shown} gives {match.params:,} parameters ({match.off(target):+.1%})"
    )
    return match.settings
