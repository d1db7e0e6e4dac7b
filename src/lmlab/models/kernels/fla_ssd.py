"""Mamba-2's SSD on flash-linear-attention's chunked Triton kernels (the optional `fla-core` wheel).

The SSD recurrence (ssd.py) is fla's "simple gated linear attention" with one scalar decay per head
and step: state_t = exp(g_t) state_{t-1} + k_t v_t^T, o_t = q_t . state_t. With q = C, k = B,
v = dt x, g = dt A and no 1/sqrt(d) scale the two are the same sum, so fla's fused forward and
backward (states kept on chip, chunks as tensor-core matmuls) stand in for the pure-PyTorch
`ssd_chunked`, which stays the reference it is tested against (tests/test_mamba2.py).
fla's chunk length is its own (64); `model.chunk_size` shapes only the PyTorch path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ssd_fla(x: Tensor, a: Tensor, b: Tensor, c: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`ssd_chunked`'s contract (x [B, T, H, P], a [B, T, H], b and c [B, T, G, N], state [B, H, P, N])
    on fla's kernel. Groups are widened to one B and C per head (fla has no grouped form); x, B and C
    run in B's dtype (the model's: bf16 under autocast), the decays and the state in fp32."""
    from fla.ops.simple_gla import chunk_simple_gla

    heads_per_group = x.size(2) // b.size(2)
    k, q = (t.repeat_interleave(heads_per_group, dim=2) for t in (b, c))
    v = x.to(k.dtype)
    initial = None if state is None else state.float().contiguous()
    y, final = chunk_simple_gla(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        g=a.float().contiguous(),
        scale=1.0,
        initial_state=initial,
        output_final_state=True,
        state_v_first=True,  # the state as [H, P, N], ssd.py's layout
    )
    return y, final.to(torch.float32)
