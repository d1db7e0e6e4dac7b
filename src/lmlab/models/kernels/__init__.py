"""Fused kernels for the models' hot loops, each optional: a model asks here whether one can run and
keeps its pure-PyTorch path (the reference the kernels are tested against) otherwise."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch


@functools.cache
def triton_selective_scan() -> Callable | None:
    """The Triton selective scan (kernels/triton_scan.py) if Triton imports here, else None."""
    try:
        from lmlab.models.kernels.triton_scan import selective_scan_fused
    except (ImportError, OSError, RuntimeError):  # no triton, or one that does not load beside this torch
        return None
    return selective_scan_fused


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
