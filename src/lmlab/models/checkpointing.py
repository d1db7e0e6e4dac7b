"""Activation checkpointing of one block (perf.activation_checkpointing): only the block's inputs are
kept for the backward pass, which runs the block's forward a second time to get the rest.

The second run must save the very tensors the first one would have. torch restores the RNG state
(dropout draws the same masks) and autocast; the attention kernels are restored here, since
`perf.attention` pins them around the forward only and the second run comes in the backward pass.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

ATTENTION_KERNEL_FLAGS = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
}


def checkpointed(block: nn.Module, *args: Any) -> Any:
    """block(*args), its activations recomputed in the backward pass rather than kept. A compiled block
    replays the kernels it traced, and takes torch.compile's own plain checkpointing: every op of the
    block recomputed (decided here, while tracing, since some torch versions call context_fn outside it)."""
    context_fn = recompute_everything if torch.compiler.is_compiling() else same_attention_kernels
    return checkpoint(block, *args, use_reentrant=False, context_fn=context_fn)


def same_attention_kernels() -> tuple[Any, Any]:
    """checkpoint's context_fn, called as the block first runs: the forward as it is, the recompute on
    the attention kernels allowed now."""
    return contextlib.nullcontext(), AttentionKernels()


def recompute_every_op(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The policy of torch.compile's own checkpointing: nothing of the block kept, all recomputed."""
    return CheckpointPolicy.PREFER_RECOMPUTE


recompute_everything = partial(create_selective_checkpoint_contexts, recompute_every_op)


class AttentionKernels:
    """The scaled_dot_product_attention kernels allowed when this was made, allowed again on each entry
    (a backward with retain_graph=True runs the block once more per backward)."""

    def __init__(self) -> None:
        self.kernels = [kernel for kernel, enabled in ATTENTION_KERNEL_FLAGS.items() if enabled()]
        self._entered: list[Any] = []

    def __enter__(self) -> None:
        context = sdpa_kernel(self.kernels)
        context.__enter__()
        self._entered.append(context)

    def __exit__(self, *exc_info: Any) -> None:
        self._entered.pop().__exit__(*exc_info)
