"""Mamba's selective scan in pure PyTorch: a log-depth parallel scan for training and a step-by-step
reference that the tests hold it to.

The SSM recurrence h_t = a_t * h_{t-1} + b_t is a composition of affine maps, and composing
(a1, b1) then (a2, b2) gives (a1 a2, a2 b1 + b2), an associative operation. So pairs of steps can be
merged in parallel, the half-length sequence scanned the same way, and the other half filled in:
2 log2(T) rounds of elementwise work instead of T sequential steps (Blelloch 1990; Martin & Cundy 2018).
"""

from __future__ import annotations

import torch
from torch import Tensor

SCANS = ("auto", "parallel", "sequential")


def resolve_scan(method: str, device: torch.device) -> str:
    """`auto`: the parallel scan on a GPU, where its log depth pays; the sequential one on a CPU, where
    the parallel scan's extra elementwise work costs more than its depth saves (1.3-1.8x slower
    forward + backward at 64-4,096 steps, docs/benchmarks.md)."""
    if method != "auto":
        return method
    return "parallel" if device.type == "cuda" else "sequential"


def parallel_scan(a: Tensor, b: Tensor) -> Tensor:
    """All h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along dim 1 of a, b [B, T, ...], in O(log T) rounds."""
    length = a.size(1)
    if length == 1:
        return b
    if length % 2:  # pad with the identity map (a=1, b=0) so the steps pair up
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        b = torch.cat([b, torch.zeros_like(b[:, :1])], dim=1)
    a_even, a_odd, b_even, b_odd = a[:, 0::2], a[:, 1::2], b[:, 0::2], b[:, 1::2]
    h_odd = parallel_scan(a_odd * a_even, a_odd * b_even + b_odd)  # h at steps 1, 3, 5, ...
    h_even = torch.cat([b_even[:, :1], a_even[:, 1:] * h_odd[:, :-1] + b_even[:, 1:]], dim=1)  # steps 0, 2, ...
    return torch.stack([h_even, h_odd], dim=2).flatten(1, 2)[:, :length]


def sequential_scan(a: Tensor, b: Tensor) -> Tensor:
    """The same recurrence one step at a time: the reference the parallel scan must equal.

    The steps come from unbind(): indexing a[:, t] instead would make each step's backward write a
    full-size gradient of `a`, a backward quadratic in T."""
    h, out = torch.zeros_like(b[:, 0]), []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
        h = a_t * h + b_t
        out.append(h)
    return torch.stack(out, dim=1)


def selective_scan(
    u: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor,
    h0: Tensor | None = None,
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Mamba's S6 layer (Gu & Dao 2023, algorithm 2) with its skip and gate, computed in fp32.

    u, dt, z [B, T, D]; A [D, N] (negative); B, C [B, T, N]; D [D]; h0 [B, D, N] the state to start
    from. Discretised with zero-order hold for A and Euler for B: h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,
    y_t = C_t . h_t + D u_t, gated by silu(z_t). Returns y [B, T, D] (u's dtype) and h_T [B, D, N] (fp32).
    """
    dtype = u.dtype
    u, dt, B, C, z = (t.float() for t in (u, dt, B, C, z))
    a = torch.exp(dt.unsqueeze(-1) * A.float())  # [B, T, D, N], in (0, 1]: the state decays
    b = (dt * u).unsqueeze(-1) * B.unsqueeze(2)
    if h0 is not None:  # start from h0: fold it into the first step
        b = torch.cat([b[:, :1] + a[:, :1] * h0.float().unsqueeze(1), b[:, 1:]], dim=1)
    h = (parallel_scan if resolve_scan(method, a.device) == "parallel" else sequential_scan)(a, b)
    y = torch.einsum("btdn,btn->btd", h, C) + u * D.float()
    return (y * torch.nn.functional.silu(z)).to(dtype), h[:, -1]
