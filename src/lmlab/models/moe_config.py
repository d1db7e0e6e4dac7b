"""The mixture-of-experts settings that gpt, llama and jamba share, written once (`model.moe.*`).

One dataclass instead of the same four keyword arguments in three constructors: each model takes
`moe`, checks it against its own depth and asks it for each layer's feed-forward. A config or a
checkpoint hands it over as a plain mapping; `MoEConfig.of` turns that into the dataclass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from lmlab.models.moe import mlp_or_moe


@dataclass(frozen=True)
class MoEConfig:
    """n_experts=0: a plain feed-forward everywhere. Otherwise every `moe_every`-th layer's feed-forward
    becomes `n_experts` copies, each token routed to `top_k` of them, with `aux_loss_weight` times the
    load-balancing loss added to the training loss (moe.py). `capacity_factor` None drops no token
    (shapes depend on the routing); a number caps each expert's rows in training (static shapes)."""

    n_experts: int = 0
    top_k: int = 2
    moe_every: int = 1
    aux_loss_weight: float = 0.01
    capacity_factor: float | None = None

    @classmethod
    def of(cls, settings: MoEConfig | Mapping[str, Any] | None) -> MoEConfig:
        """The dataclass from what a config or a checkpoint holds: a mapping of its keys, or None for
        the defaults."""
        if settings is None or isinstance(settings, cls):
            return settings or cls()
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(
                f"moe has no setting {unknown[0]!r}: model.moe takes {', '.join(known)}; fix model.moe.{unknown[0]}"
            )
        return cls(**settings)

    def check(self, n_layer: int) -> None:
        """Routing settings a model of `n_layer` layers can use; each message names its `model.moe.*` key."""
        if self.n_experts < 0:
            raise ValueError(
                f"n_experts must be >= 0 (got {self.n_experts}): set model.moe.n_experts to 0 (no experts) or more"
            )
        if self.n_experts == 0:
            return
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"top_k must be between 1 and n_experts={self.n_experts} (got {self.top_k}): "
                "set model.moe.top_k <= model.moe.n_experts"
            )
        if not 1 <= self.moe_every <= n_layer:
            raise ValueError(
                f"moe_every={self.moe_every} must be between 1 and the stack's n_layer={n_layer}, or no layer would "
                "be a mixture of experts: set model.moe.moe_every <= model.n_layer"
            )
        if self.aux_loss_weight < 0:
            raise ValueError(
                f"aux_loss_weight must be >= 0 (got {self.aux_loss_weight}): set model.moe.aux_loss_weight to e.g. 0.01"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"capacity_factor must be > 0 (got {self.capacity_factor}): set model.moe.capacity_factor to e.g. "
                "1.25, or null to never drop a token"
            )

    @classmethod
    def nest_flat_keys(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """A model config as written now from one written before the MoE keys moved under `moe`: the
        checkpoints of earlier versions hold n_experts, top_k, moe_every and aux_loss_weight at the top."""
        names = [f.name for f in fields(cls)]
        flat = {key: settings[key] for key in names if key in settings}
        if not flat:
            return dict(settings)
        return {**{key: value for key, value in settings.items() if key not in flat}, "moe": flat}

    def feed_forward(self, layer: int, make_mlp: Callable[[], nn.Module], d_model: int) -> nn.Module:
        """Layer `layer`'s feed-forward: a mixture of `make_mlp` experts or one make_mlp()."""
        return mlp_or_moe(
            layer,
            make_mlp,
            d_model,
            self.n_experts,
            self.top_k,
            self.moe_every,
            self.aux_loss_weight,
            self.capacity_factor,
        )
