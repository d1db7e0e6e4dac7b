"""Rotary position embeddings (Su et al. 2021, RoFormer), as in Llama.

Each pair of channels of a query or key is rotated by an angle proportional to the token's
position, so the dot product of a query and a key depends on their distance only. A model meets
only the positions it was trained on; `scaling` (position interpolation, Chen et al. 2023) divides
positions by a factor so a context `scaling` times longer maps back into the trained range.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_rope(x: Tensor, positions: Tensor, base: float, scaling: float | None = None) -> Tensor:
    """Rotate x [B, H, T, head_dim] for `positions` [T]. Channel i pairs with channel i + head_dim//2
    (the GPT-NeoX layout); an odd head_dim leaves its last channel unrotated."""
    n_pairs = x.size(-1) // 2
    inv_freq = base ** (-torch.arange(n_pairs, device=x.device, dtype=torch.float32) / n_pairs)
    pos = positions.to(torch.float32) / (scaling or 1.0)
    angles = pos[:, None] * inv_freq[None, :]  # [T, n_pairs], in fp32 whatever the model's dtype
    cos, sin = angles.cos(), angles.sin()
    x1, x2, rest = x[..., :n_pairs].float(), x[..., n_pairs : 2 * n_pairs].float(), x[..., 2 * n_pairs :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1) if rest.size(-1) else rotated
