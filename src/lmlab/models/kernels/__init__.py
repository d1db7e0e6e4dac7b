"""Fused kernels for the models' hot loops, each optional: a model asks here whether one can run and
keeps its pure-PyTorch path (the reference the kernels are tested against) otherwise."""

from __future__ import annotations

import functools
import importlib.util
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


@functools.cache
def fla_ssd() -> Callable | None:
    """Mamba-2's SSD on flash-linear-attention's kernels (kernels/fla_ssd.py) if `fla` imports, else None."""
    try:
        import fla.ops.simple_gla  # noqa: F401  (its Triton kernels; an optional wheel)

        from lmlab.models.kernels.fla_ssd import ssd_fla
    except (ImportError, OSError, RuntimeError):  # not installed, or no Triton that loads beside this torch
        return None
    return ssd_fla


def fla_refusal() -> str | None:
    """Why fla's SSD backward would refuse to run here, in fla's own terms, or None. fla-core 0.6 stops
    on Hopper GPUs with Triton in [3.4, 3.7.1) (a Triton miscompile of its gated backward, fla issue
    #640) unless tilelang is installed; asked when a model is built rather than mid-training."""
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:  # another fla version: it knows its own limits
        return None
    import triton

    if (
        IS_NVIDIA_HOPPER
        and TRITON_ABOVE_3_4_0
        and not TRITON_ABOVE_3_7_1
        and importlib.util.find_spec("tilelang") is None
    ):
        return f"flash-linear-attention's gated backward is wrong on Hopper GPUs with Triton {triton.__version__} (< 3.7.1)"
    return None


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
