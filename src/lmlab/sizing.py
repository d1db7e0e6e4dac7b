"""Parameter-matched sizing: the width that brings any architecture closest to a parameter budget.

Comparing a 2-layer LSTM with a 3-layer GPT at the same `d_model` compares models of very different
sizes. `model.target_params=N` instead keeps every setting but the width and picks the `d_model`
whose exact parameter count is nearest to N. The vocabulary (and so the embedding's share) is only
known once the tokenizer is trained, which is why this runs right before the model is built.
Counting is done by building the model on PyTorch's meta device: exact, free of memory, and
without a second copy of each architecture's parameter formula.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, open_dict

from lmlab.config import build
from lmlab.errors import ConfigError
from lmlab.models import count_parameters

log = logging.getLogger(__name__)

MAX_WIDTH_STEPS = 1 << 16  # widths are searched up to 65,536 x the width step


def parameters_at_width(model_cfg: DictConfig, vocab_size: int, d_model: int) -> int:
    """The exact parameter count of `model_cfg` built with width `d_model` (and a d_ff scaled with it)."""
    node = model_cfg.copy()  # keeps its parent, so interpolations like ${data.block_size} still resolve
    with open_dict(node):
        node.pop("target_params", None)
    with torch.device("meta"):
        model = build(node, "model", vocab_size=vocab_size, **_width_settings(model_cfg, d_model))
    return count_parameters(model)


def _width_settings(model_cfg: DictConfig, d_model: int) -> dict[str, int]:
    """d_model, plus d_ff kept at the configured d_ff/d_model ratio where the model has one."""
    settings = {"d_model": d_model}
    if model_cfg.get("d_ff") is not None:
        settings["d_ff"] = max(1, round(model_cfg.d_ff / model_cfg.d_model * d_model))
    return settings


def match_width(model_cfg: DictConfig, vocab_size: int, target_params: int) -> tuple[int, int]:
    """(d_model, parameters) of the width closest to `target_params`; widths stay multiples of n_head.

    Parameters grow with width, so a doubling search brackets the target and a bisection finds the
    first width at or above it; the answer is that width or the one just below.
    """
    step = int(model_cfg.get("n_head") or 1)
    count = {}

    def params(k: int) -> int:
        if k not in count:
            count[k] = parameters_at_width(model_cfg, vocab_size, k * step)
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


def apply_target_params(model_cfg: DictConfig, vocab_size: int) -> int | None:
    """Pop `model.target_params` (not a model argument) and, if set, write the matched width into the config.

    Returns the target, or None when the run is not parameter-matched.
    """
    with open_dict(model_cfg):
        target = model_cfg.pop("target_params", None)
    if target is None:
        return None
    if int(target) < 1:
        raise ConfigError(f"model.target_params must be a positive number of parameters (got {target})")
    if model_cfg.get("d_model") is None:
        raise ConfigError("model.target_params needs a model with a d_model width: remove model.target_params")
    d_model, params = match_width(model_cfg, vocab_size, int(target))
    with open_dict(model_cfg):
        model_cfg.update(_width_settings(model_cfg, d_model))
    off = params / int(target) - 1
    log.info(f"model.target_params={int(target):,}: d_model={d_model} gives {params:,} parameters ({off:+.1%})")
    if abs(off) > 0.1:
        log.warning(
            f"the closest width is {off:+.1%} off model.target_params={int(target):,}: "
            "change the depth (model.n_layer) or the vocabulary to get nearer"
        )
    return int(target)
