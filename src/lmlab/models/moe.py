"""Mixture-of-experts feed-forward with top-k routing (Shazeer et al. 2017; Switch, Mixtral, Jamba).

Each token goes to the `top_k` experts its router scores highest, weighted by the router's
probabilities renormalised over those k. Nothing stops a router from sending every token to the
same expert, so a load-balancing loss (Fedus et al. 2021, eq. 4) is added to the training loss:
n_experts * sum_e f_e * P_e, with f_e the share of routing slots expert e received and P_e its
mean router probability. It is 1 when the load is even and grows as the load concentrates.
Tokens are never dropped (no capacity limit), so routing stays per token and causal.
"""

from __future__ import annotations

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
) -> nn.Module:
    """The feed-forward of layer `layer`: a mixture of `make_mlp` experts on every `moe_every`-th
    layer when n_experts > 0 (GPT, Llama and Jamba share this rule), else one make_mlp()."""
    if is_moe_layer(layer, n_experts, moe_every):
        return MoE(d_model, n_experts, top_k, aux_loss_weight, make_mlp)
    return make_mlp()


class MoE(nn.Module):
    """`n_experts` copies of a feed-forward built by `make_expert`, and a linear router."""

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
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_e == e).nonzero(as_tuple=True)
            y = expert(x[rows]) * weights[rows, slot, None]
            out = out.index_add(0, rows, y.to(out.dtype))
        n_experts = len(self.experts)
        share = torch.bincount(top_e.flatten(), minlength=n_experts).to(probs.dtype) / top_e.numel()
        self.weighted_loss = self.aux_loss_weight * n_experts * (share * probs.mean(0)).sum()
        return out.reshape(shape)
