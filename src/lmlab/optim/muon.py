"""Muon for the hidden weight matrices and AdamW for the rest, as one optimizer.

Muon (Jordan et al. 2024, torch.optim.Muon) replaces each matrix's momentum by the nearest
semi-orthogonal matrix (Newton-Schulz iterations), so every direction of the update moves at the
same rate. It is defined for 2-D weights that map hidden vectors to hidden vectors; embeddings, the
output layer, norms and biases keep AdamW (lmlab.optim.groups.hidden_matrix_groups marks which).

Lightning drives one optimizer per run, and a checkpoint must restore both halves exactly, so the
two live inside one torch.optim.Optimizer: its param_groups are the two inner optimizers' group
dicts (a schedule scales both), its `state` is one dict they share (parameters are disjoint), and
torch's own state_dict/load_state_dict save and restore them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lmlab.errors import ConfigError


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the parameter groups marked `"muon": True`, torch.optim.AdamW on the others.

    `lr`, `momentum`, `nesterov`, `ns_steps` and `adjust_lr_fn` are Muon's; `adamw_lr`, `betas` and
    `eps` are AdamW's. Each group keeps its own `weight_decay`, applied decoupled as lr x decay with
    its optimizer's lr. A plain list of tensors (no groups) goes to AdamW.
    """

    splits_hidden_matrices = True  # lmlab.optim.groups.optimizer_parameter_groups: mark the hidden matrices

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        weight_decay: float = 0.0,
        adamw_lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
    ) -> None:
        groups = _as_groups(params)
        hidden = [_without_mark(g) for g in groups if g.get("muon")]
        rest = [_without_mark(g) for g in groups if not g.get("muon")]
        for group in hidden:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ConfigError(
                        f"optimizer=muon got a parameter of shape {tuple(p.shape)} to orthogonalise: Muon takes 2-D "
                        "weight matrices only; leave biases, norms and other shapes to its AdamW groups"
                    )
        hidden = [g for g in hidden if g["params"]]
        self.muon = (
            torch.optim.Muon(
                hidden,
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                adjust_lr_fn=adjust_lr_fn,
                weight_decay=weight_decay,
            )
            if hidden
            else None
        )
        self.adamw = torch.optim.AdamW(rest, lr=adamw_lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._n_muon_groups = len(hidden)
        super().__init__([*self._inner_groups(), *self.adamw.param_groups], {})
        self._share_state()

    def _inner_groups(self) -> list[dict]:
        return self.muon.param_groups if self.muon is not None else []

    def _share_state(self) -> None:
        """Point both inner optimizers at this optimizer's groups and state (after a load replaces them)."""
        if self.muon is not None:
            self.muon.param_groups = self.param_groups[: self._n_muon_groups]
            self.muon.state = self.state
        self.adamw.param_groups = self.param_groups[self._n_muon_groups :]
        self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share_state()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.muon is not None:
            self.muon.step()
        self.adamw.step()
        return loss


def _as_groups(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    params = list(params)
    if params and isinstance(params[0], dict):
        return params
    return [{"params": params}]


def _without_mark(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key != "muon"}
