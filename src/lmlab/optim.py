"""Optimizer parameter groups and learning-rate schedules.

Weight decay shrinks weight matrices towards zero; applied to biases, norm gains or embeddings it
only hurts (GPT-2/nanoGPT practice), so those go in an undecayed group.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into decayed matrices and everything else (biases, norms, embeddings)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # a model marks matrices that are not weights (Mamba's A_log: decay rates) with _no_weight_decay
        decayed = p.dim() >= 2 and id(p) not in embeddings and not getattr(p, "_no_weight_decay", False)
        (decay if decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _decay_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """How far past warmup towards the last step, from 0 to 1."""
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """Linear warmup, then cosine decay to `min_lr_ratio` x the peak at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = _decay_progress(step, warmup_steps, total_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_linear(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup, then linear decay to `min_lr_ratio` x the peak at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        return 1 - (1 - min_lr_ratio) * _decay_progress(step, warmup_steps, total_steps)

    return LambdaLR(optimizer, factor)


def warmup_constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100) -> LambdaLR:
    """Linear warmup, then the peak learning rate throughout."""
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps))
