"""AdamW with 8-bit state (torchao.optim.AdamW8bit; Dettmers et al. 2022's block-wise quantisation).

Both moments are stored in 8 bits per weight, each block of 256 values with its own scale, which
cuts AdamW's state from 8 to about 2 bytes per parameter. torchao compiles its update for the GPU;
on a CPU it would compile for minutes and run slower than AdamW, so lmlab refuses it there
(lmlab.optim.groups.check_optimizer_device), in one line naming the setting.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lmlab.errors import ConfigError


def adamw_8bit(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    block_size: int = 256,
) -> torch.optim.Optimizer:
    """torchao's AdamW8bit, or a one-line error naming the extra that installs it."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise ConfigError(
            "optimizer=adamw8bit needs torchao (pip install -e '.[fp8]'); or set optimizer=adamw"
        ) from None
    return AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size)


# why a CPU run is refused (lmlab.optim.groups.check_optimizer_device)
adamw_8bit.gpu_only = "optimizer=adamw8bit keeps its state in 8 bits with torchao's GPU kernels"
