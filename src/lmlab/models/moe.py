"""Mixture-of-experts feed-forward with top-k routing (Shazeer et al. 2017; Switch, Mixtral, Jamba).

Each token goes to the `top_k` experts its router scores highest, weighted by the router's
probabilities renormalised over those k. Nothing stops a router from sending every token to the
same expert, so a load-balancing loss (Fedus et al. 2021, eq. 4) is added to the training loss:
n_experts * sum_e f_e * P_e, with f_e the share of routing slots expert e received and P_e its
mean router probability. It is 1 when the load is even and grows as the load concentrates.

Without `capacity_factor` (MoE) no token is dropped: each expert runs on the rows routed to it, a
number known only once the router has run, so the forward syncs with the host and its shapes depend
on the data (no CUDA graph). With it (CapacityMoE), each expert takes at most
capacity = ceil(capacity_factor x top_k x tokens / n_experts) rows in training (Switch, GShard):
tokens are scattered into a fixed [n_experts, capacity] buffer by a cumulative count, so every shape
is static and nothing waits on the host. A routing slot past its expert's capacity is dropped: it
adds nothing, and a token whose every slot is dropped passes through the block's residual unchanged.
Slots fill first choices before second ones, then by position, then by batch row, so whether a
token is dropped never depends on a later token. In eval mode the capacity is every token (no
drops), so scores and generation do not depend on what else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


def is_moe_layer(layer: int, n_experts: int, moe_every: int) -> bool:
    """Every `moe_every`-th layer, ending each period (moe_every=2: layers 1, 3, 5, ... as in Jamba)."""
    return n_experts > 0 and (layer + 1) % moe_every == 0


def mlp_or_moe(
    layer: int,
    make_mlp: Callable[[], nn.Module],
    d_model: int,
    n_experts: int,
    top_k: int,
    moe_every: int,
    aux_loss_weight: float,
    capacity_factor: float | None = None,
) -> nn.Module:
    """The feed-forward of layer `layer`: a mixture of `make_mlp` experts on every `moe_every`-th
    layer when n_experts > 0 (GPT, Llama and Jamba share this rule), else one make_mlp()."""
    if not is_moe_layer(layer, n_experts, moe_every):
        return make_mlp()
    if capacity_factor is None:
        return MoE(d_model, n_experts, top_k, aux_loss_weight, make_mlp)
    return CapacityMoE(d_model, n_experts, top_k, aux_loss_weight, make_mlp, capacity_factor)


class MoE(nn.Module):
    """`n_experts` copies of a feed-forward built by `make_expert`, and a linear router; no token dropped."""

    data_dependent_shapes = True  # how many tokens each expert gets depends on the tokens (LanguageModel reads it)

    def __init__(
        self, d_model: int, n_experts: int, top_k: int, aux_loss_weight: float, make_expert: Callable[[], nn.Module]
    ) -> None:
        super().__init__()
        self.top_k, self.aux_loss_weight = top_k, aux_loss_weight
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(n_experts))
        self.weighted_loss: Tensor | None = None  # aux_loss_weight x balance loss of the last forward

    def idle_parameters(self) -> int:
        """Parameters of the experts a token does not visit: left out of FLOPs per token."""
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return (len(self.experts) - self.top_k) * per_expert

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(-1)  # [N, E], in fp32 like every softmax here
        top_p, top_e = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True)
        n_experts = len(self.experts)
        chosen = top_e[..., None] == torch.arange(n_experts, device=x.device)  # [N, k, E]; one_hot would sync
        share = chosen.sum((0, 1)).to(probs.dtype) / top_e.numel()
        self.weighted_loss = self.aux_loss_weight * n_experts * (share * probs.mean(0)).sum()
        return self.combine(x, top_e, chosen, weights, shape[:-1]).reshape(shape)

    def combine(self, x: Tensor, top_e: Tensor, chosen: Tensor, weights: Tensor, leading: torch.Size) -> Tensor:
        """sum_k weight_k expert_k(x) for every row of x [N, d], its experts top_e and their weights
        [N, k] (chosen [N, k, E]: top_e as a mask; `leading`: x's shape before it was flattened).
        Here each expert runs on exactly the rows routed to it."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_e == e).nonzero(as_tuple=True)
            y = expert(x[rows]) * weights[rows, slot, None]
            out = out.index_add(0, rows, y.to(out.dtype))
        return out


class CapacityMoE(MoE):
    """MoE whose experts take at most `capacity` rows each in training (model.moe.capacity_factor):
    the same weights and routing, shapes fixed before the data, slots past the capacity dropped."""

    data_dependent_shapes = False

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        aux_loss_weight: float,
        make_expert: Callable[[], nn.Module],
        capacity_factor: float,
    ) -> None:
        super().__init__(d_model, n_experts, top_k, aux_loss_weight, make_expert)
        self.capacity_factor = capacity_factor

    def capacity(self, n_tokens: int) -> int:
        """Rows each expert takes from `n_tokens` tokens: every token in eval mode, else the capacity factor's share."""
        if not self.training:
            return n_tokens
        return min(n_tokens, math.ceil(self.capacity_factor * self.top_k * n_tokens / len(self.experts)))

    def combine(self, x: Tensor, top_e: Tensor, chosen: Tensor, weights: Tensor, leading: torch.Size) -> Tensor:
        """Scatter the routing slots into an [n_experts x capacity] buffer, run each expert on its
        block, gather back; slots past their expert's capacity get weight zero. Static shapes only.

        With (B, T) rows, the (b, t) rows queue as (t, b): a token's place in line then depends only
        on tokens at or before its position."""
        n_tokens, top_k, n_experts = chosen.shape
        capacity = self.capacity(n_tokens)
        order = torch.arange(n_tokens, device=x.device)
        if len(leading) == 2:
            order = order.view(leading).t().reshape(-1)
        line = chosen[order].transpose(0, 1).reshape(top_k * n_tokens, n_experts)  # first choices first
        place = (line.cumsum(0) * line).sum(-1) - 1  # each slot's place in its expert's line
        kept = place < capacity
        expert = top_e[order].t().reshape(-1)
        slot = expert * capacity + place.clamp(max=capacity - 1)  # a dropped slot adds zero wherever it lands
        rows = order.repeat(top_k)  # the token of each slot
        buffer = x.new_zeros(n_experts * capacity, x.size(1))
        buffer = buffer.index_add(0, slot, x[rows] * kept[:, None].to(x.dtype))
        blocks = buffer.view(n_experts, capacity, -1)
        y = torch.cat([expert_mlp(blocks[e]) for e, expert_mlp in enumerate(self.experts)])
        gate = weights[order].t().reshape(-1) * kept  # dropped slots weigh nothing
        return torch.zeros_like(x).index_add(0, rows, (y[slot] * gate[:, None]).to(x.dtype))
