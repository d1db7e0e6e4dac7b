"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of a momentum.

Each step moves every weight by exactly lr, in the direction of sign(beta1 m + (1 - beta1) g), then
updates the momentum m with the slower beta2. One state tensor per weight (AdamW keeps two), and an
update whose size does not depend on the gradient's: Lion wants a learning rate 3-10x smaller than
AdamW's and a weight decay 3-10x larger for the same effective decay lr x weight_decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class Lion(torch.optim.Optimizer):
    """w <- w (1 - lr wd) - lr sign(beta1 m + (1 - beta1) g);  m <- beta2 m + (1 - beta2) g."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"task.optimizer.lr={lr} must be >= 0")
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"task.optimizer.betas={list(betas)} must both be in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), decay = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                momentum = state["exp_avg"]
                p.mul_(1 - lr * decay)
                p.add_(momentum.lerp(p.grad, 1 - beta1).sign_(), alpha=-lr)
                momentum.lerp_(p.grad, 1 - beta2)
        return loss
