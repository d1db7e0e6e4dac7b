"""Rotary position embeddings (Su et al. 2021, RoFormer), as in Llama.

Each pair of channels of a query or key is rotated by an angle proportional to the token's
position, so the dot product of a query and a key depends on their distance only. A model meets
only the positions it was trained on; `scaling` (position interpolation, Chen et al. 2023) divides
positions by a factor so a context `scaling` times longer maps back into the trained range.

The angles depend on the positions only, so a model computes their cosines and sines once per
forward (`rope_tables`) and every layer's queries and keys reuse them (`rotate`): five elementwise
ops per rotated tensor, instead of recomputing the tables and upcasting to fp32 in each layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(
    positions: Tensor, head_dim: int, base: float, scaling: float | None = None, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin [T, head_dim] of every channel's angle at `positions` [T], computed in fp32 and
    returned in `dtype` (the queries' dtype: Hugging Face's Llama rotates in it too). Channel i pairs
    with channel i + head_dim//2 (the GPT-NeoX layout); an odd head_dim's last channel has angle 0."""
    n_pairs = head_dim // 2
    inv_freq = base ** (-torch.arange(n_pairs, device=positions.device, dtype=torch.float32) / n_pairs)
    angles = (positions.to(torch.float32) / (scaling or 1.0))[:, None] * inv_freq[None, :]  # [T, n_pairs]
    angles = torch.cat([angles, angles, angles.new_zeros(angles.size(0), head_dim % 2)], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., T, head_dim] rotated by the tables of `rope_tables`: x cos + rotate_half(x) sin, where
    rotate_half maps the pair (x1, x2) to (-x2, x1) and leaves an odd last channel to a zero sine."""
    n_pairs = x.size(-1) // 2
    x1, x2, rest = x[..., :n_pairs], x[..., n_pairs : 2 * n_pairs], x[..., 2 * n_pairs :]
    return x * cos + torch.cat([-x2, x1, rest], dim=-1) * sin


def apply_rope(x: Tensor, positions: Tensor, base: float, scaling: float | None = None) -> Tensor:
    """Rotate x [B, H, T, head_dim] for `positions` [T], building the tables for this call alone."""
    return rotate(x, *rope_tables(positions, x.size(-1), base, scaling, x.dtype))
