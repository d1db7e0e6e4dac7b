"""State space duality (Dao & Gu 2024, "Transformers are SSMs"): Mamba-2's scan, chunked into matmuls.

Mamba-2's recurrence, per head h with a scalar decay a_t = dt_t A_h (A_h < 0):

    state_t = exp(a_t) state_{t-1} + x_t B_t^T        (state [head_dim, d_state], x_t already times dt_t)
    y_t     = state_t C_t

Because the decay is one number per head and step, the outputs of a chunk of Q steps are a masked
matmul, y = (L o C B^T) x with L[t, s] = exp(a_{s+1} + ... + a_t) for s <= t: the chunk mixes like
causal attention, on tensor cores. Between chunks only the state at each chunk boundary is carried,
by a matmul over the T/Q chunk boundaries. `ssd_chunked` computes that; `ssd_step` is the recurrence for one token,
which generation uses and against which the tests check the chunked form.

Shapes: x [B, T, H, P], a [B, T, H], b and c [B, T, G, N] with G groups of B/C shared by H/G heads
each, the state [B, H, P, N]. The decays are summed and exponentiated in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def segment_sums(a: Tensor) -> Tensor:
    """[..., Q] -> [..., Q, Q]: entry (t, s) = a[s+1] + ... + a[t] for s <= t, -inf above the diagonal,
    so exp() of it is the decay from step s to step t, zero where s is in t's future (the causal mask).
    Differences of one cumulative sum would cancel catastrophically; summing masked copies does not."""
    q = a.size(-1)
    repeated = a[..., :, None].expand(*a.shape, q)  # [..., t, s] = a[t]
    strictly_below = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(-1)
    sums = repeated.masked_fill(~strictly_below, 0).cumsum(dim=-2)
    below = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~below, float("-inf"))


def ssd_chunked(
    x: Tensor, a: Tensor, b: Tensor, c: Tensor, chunk_size: int, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """y [B, T, H, P] and the final state [B, H, P, N] of the recurrence over T steps from `state`
    (None: zeros). T need not be a multiple of chunk_size: the tail is padded with steps that neither
    decay the state (a = 0) nor write to it (x = 0)."""
    b, c = b.to(x.dtype), c.to(x.dtype)  # one dtype for the matmuls (a bf16 model feeds fp32 x)
    batch, length, n_heads, head_dim = x.shape
    n_groups, d_state = b.shape[-2:]
    heads_per_group = n_heads // n_groups
    q = min(chunk_size, length)
    pad = -length % q
    if pad:
        x, a, b, c = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, a, b, c))
    n_chunks = (length + pad) // q

    # [batch, chunk, step, group, head in group, ...]: heads of one group share its B and C
    x = x.reshape(batch, n_chunks, q, n_groups, heads_per_group, head_dim)
    b = b.reshape(batch, n_chunks, q, n_groups, d_state)
    c = c.reshape(batch, n_chunks, q, n_groups, d_state)
    a = a.float().reshape(batch, n_chunks, q, n_groups, heads_per_group).permute(0, 1, 3, 4, 2)  # [.., g, r, q]
    a_cumsum = a.cumsum(dim=-1)

    # within each chunk: y = (L o C B^T) x, a causal "attention" whose weights are decays
    scores = torch.einsum("bclgn,bcsgn->bcgls", c, b)
    weights = scores[:, :, :, None] * torch.exp(segment_sums(a)).to(scores.dtype)  # [b, c, g, r, l, s]
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", weights, x)

    # each chunk's own contribution to the state at its end
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum).permute(0, 1, 4, 2, 3)[..., None]  # [b, c, s, g, r, 1]
    chunk_states = torch.einsum("bcsgn,bcsgrp->bcgrpn", b, (x * decay_to_end.to(x.dtype)))

    # across chunks: the state entering chunk i is every earlier chunk's contribution (and the starting
    # state's) decayed over the chunks between: one small matmul over the chunk axis, not a loop
    initial = x.new_zeros(batch, 1, n_groups, heads_per_group, head_dim, d_state, dtype=torch.float32)
    if state is not None:
        initial = state.float().reshape(initial.shape)
    states = torch.cat([initial, chunk_states.float()], dim=1)  # [b, c + 1, g, r, p, n]
    chunk_totals = F.pad(a_cumsum[..., -1], (0, 0, 0, 0, 1, 0)).permute(0, 2, 3, 1)  # [b, g, r, c + 1]
    carry = torch.exp(segment_sums(chunk_totals))  # [b, g, r, to, from]
    carried = torch.einsum("bgrzc,bcgrpn->bzgrpn", carry, states)
    entering, carried = carried[:, :-1], carried[:, -1]  # the state each chunk starts from; the final one

    # what the state entering a chunk adds to each step of it, decayed up to that step
    decay_in = torch.exp(a_cumsum).permute(0, 1, 4, 2, 3)[..., None]  # [b, c, l, g, r, 1]
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", c, entering.to(c.dtype)) * decay_in.to(y.dtype)

    y = y.reshape(batch, n_chunks * q, n_heads, head_dim)[:, :length]
    return y, carried.reshape(batch, n_heads, head_dim, d_state)


def ssd_step(x: Tensor, a: Tensor, b: Tensor, c: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the recurrence: x [B, H, P], a [B, H], b and c [B, G, N], state [B, H, P, N] (fp32)
    -> (y [B, H, P], new state)."""
    heads_per_group = x.size(1) // b.size(1)
    b, c = (t.float().repeat_interleave(heads_per_group, dim=1) for t in (b, c))  # [B, H, N]
    state = torch.exp(a.float())[..., None, None] * state + x.float()[..., None] * b[:, :, None]
    return torch.einsum("bhpn,bhn->bhp", state, c).to(x.dtype), state
