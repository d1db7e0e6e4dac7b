"""Which kernel `scaled_dot_product_attention` runs (`perf.attention`), chosen around each forward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
SHORT_CPU_CONTEXT = 128  # up to here a CPU trains faster with the math attention kernel (auto_attention)


def attention_context(name: str) -> Callable[[torch.Tensor], contextlib.AbstractContextManager]:
    """A context, given the batch's token ids, that pins scaled_dot_product_attention to one kernel
    (`perf.attention`); "auto" is `auto_attention`. On Hopper, cuDNN's attention is often faster than
    flash for training."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"perf.attention must be one of {', '.join(ATTENTION_BACKENDS)} (got {name!r})")
    if name == "auto":
        return auto_attention
    backend = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return lambda idx: sdpa_kernel([backend])


def auto_attention(idx: torch.Tensor) -> contextlib.AbstractContextManager:
    """PyTorch's choice of kernel, except for contexts of up to 128 tokens on a CPU. There its flash
    kernel's backward takes about 8x its forward, and the plain math kernel trains the default GPT
    1.35x faster under bf16 (level in fp32); from 256 tokens flash is faster (docs/benchmarks.md)."""
    if idx.device.type == "cpu" and idx.size(-1) <= SHORT_CPU_CONTEXT:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
