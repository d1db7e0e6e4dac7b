"""Which parameters an optimizer decays, and which ones Muon orthogonalises.

Weight decay shrinks weight matrices towards zero; applied to biases, norm gains or embeddings it
only hurts (GPT-2/nanoGPT practice), so those go in an undecayed group.

Muon (lmlab.optim.muon) updates hidden weight matrices only: the 2-D weights that map one hidden
vector to another (attention, MLP, recurrent weight_ih/weight_hh). Embeddings, the output layer,
norms and biases stay with AdamW, as modded-nanogpt splits them: an embedding row or an output row
is a lookup, not a linear map whose singular values mean anything.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmlab.errors import ConfigError


def decayed_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters weight decay applies to: weight matrices, not biases, norms, embeddings or
    matrices a model marks `_no_weight_decay` (Mamba's A_log: decay rates).

    Decided on the model as built: FSDP (use_orig_params) later turns each parameter into a 1-D shard
    of itself, the same object with another shape, so its dimensions no longer tell a matrix.
    """
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return {
        id(p)
        for p in model.parameters()
        if p.dim() >= 2 and id(p) not in embeddings and not getattr(p, "_no_weight_decay", False)
    }


def parameter_groups(model: nn.Module, weight_decay: float, decayed: set[int] | None = None) -> list[dict]:
    """Split trainable parameters into decayed matrices (`decayed`, by default found now) and everything else."""
    decayed = decayed_parameters(model) if decayed is None else decayed
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if id(p) in decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def hidden_matrix_groups(model: nn.Module, weight_decay: float, decayed: set[int] | None = None) -> list[dict]:
    """parameter_groups with the decayed 2-D weights, less the output layer (`model.lm_head`), split off
    into a first group marked `"muon": True`; decayed weights of other shapes (Mamba's 3-D convolution)
    and an untied output layer stay in a plain decayed group. Every family's output layer is `lm_head`.

    A decayed parameter that is 1-D here was a matrix when the model was built: FSDP has sharded it,
    and Muon cannot orthogonalise a shard.
    """
    decay, no_decay = parameter_groups(model, weight_decay, decayed)
    head = getattr(model, "lm_head", None)
    output = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    if any(p.dim() < 2 for p in decay["params"]):
        raise ConfigError(
            "optimizer=muon orthogonalises whole weight matrices, but this strategy shards them into 1-D "
            "pieces (FSDP): use trainer=ddp or a single device, or optimizer=adamw"
        )
    hidden = [p for p in decay["params"] if p.dim() == 2 and id(p) not in output]
    other = [p for p in decay["params"] if p.dim() != 2 or id(p) in output]
    return [
        {"params": hidden, "weight_decay": weight_decay, "muon": True},
        {"params": other, "weight_decay": weight_decay},
        no_decay,
    ]


def optimizer_parameter_groups(
    factory: Callable[..., torch.optim.Optimizer], model: nn.Module, weight_decay: float, decayed: set[int]
) -> list[dict]:
    """The groups `factory` is built on: hidden matrices marked apart for an optimizer class that says
    `splits_hidden_matrices` (Muon with AdamW), else decayed and undecayed parameters."""
    target = getattr(factory, "func", factory)
    if getattr(target, "splits_hidden_matrices", False):
        return hidden_matrix_groups(model, weight_decay, decayed)
    return parameter_groups(model, weight_decay, decayed)


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer],
    model: nn.Module,
    weight_decay: float,
    decayed: set[int],
    device: torch.device,
    **extra: object,
) -> torch.optim.Optimizer:
    """The run's optimizer over `model`'s parameter groups, refused in one line on a device it cannot use."""
    check_optimizer_device(factory, device)
    return factory(optimizer_parameter_groups(factory, model, weight_decay, decayed), **extra)


def check_optimizer_device(factory: Callable[..., torch.optim.Optimizer], device: torch.device) -> None:
    """One line for an optimizer whose kernels need a GPU (its `gpu_only` attribute says why)."""
    reason = getattr(getattr(factory, "func", factory), "gpu_only", None)
    if reason is not None and device.type != "cuda":
        raise ConfigError(f"{reason}, and this run is on {device.type}: set trainer=gpu, or optimizer=adamw")
