"""lmlab's GPT as transformers' GPT2LMHeadModel: same blocks, GPT-2's parameter names and layout.

Three differences of layout, none of computation: GPT-2 stores its linear layers as Conv1D, whose
weight is the transpose of nn.Linear's; it always has biases (lmlab's bias=False is written as
zeros, which computes the same); and its vocabulary is the tokenizer's, so padding rows are dropped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.export.registry import register_exporter
from lmlab.models import GPT, LanguageModel
from lmlab.models.gpt import MLP

# nn.GELU's `approximate` setting -> the transformers activation that computes the same function
_GELU = {"none": "gelu", "tanh": "gelu_new"}


def _check(model: GPT) -> None:
    if not all(isinstance(block.mlp, MLP) for block in model.blocks):
        raise ConfigError(
            "a GPT with mixture-of-experts layers (model.moe.n_experts > 0) has no GPT2LMHeadModel equivalent: "
            "export a dense GPT (model.moe.n_experts=0)"
        )
    if model.beyond_gpt2:
        raise ConfigError(
            f"a GPT with {', '.join(f'model.{name}' for name in model.beyond_gpt2)} computes what GPT2LMHeadModel "
            "cannot: export a GPT trained without them"
        )


def gpt2_config(model: GPT) -> dict[str, Any]:
    """GPT2Config's settings for `model`."""
    _check(model)
    block = model.blocks[0]
    return {
        "vocab_size": model.vocab_size,
        "n_positions": model.context_length,
        "n_embd": model.d_model,
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "n_inner": block.mlp.fc.out_features,
        "activation_function": _GELU[block.mlp.activation.approximate],
        "layer_norm_epsilon": block.ln1.eps,
        "resid_pdrop": block.attn.resid_dropout.p,
        "embd_pdrop": model.drop.p,
        "attn_pdrop": block.attn.dropout,
        "tie_word_embeddings": model.lm_head.weight is model.wte.weight,
    }


def _linear(layer: nn.Linear) -> tuple[Tensor, Tensor]:
    """A Conv1D's (weight [in, out], bias [out]) computing what `layer` computes."""
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
    return layer.weight.t(), bias


def _norm(norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    return norm.weight, norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)


def hf_weights(model: LanguageModel, embedding: str, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """`weights` with the token embedding (named `embedding`) and lm_head, less lmlab's padding rows
    (transformers' vocabulary is the tokenizer's), detached and contiguous as save_pretrained wants."""
    weights = {
        embedding: model.wte.weight[: model.vocab_size],
        "lm_head.weight": model.lm_head.weight[: model.vocab_size],
        **weights,
    }
    return {name: tensor.detach().contiguous() for name, tensor in weights.items()}


def gpt2_weights(model: GPT) -> dict[str, Tensor]:
    """GPT2LMHeadModel's state dict holding `model`'s weights."""
    _check(model)
    weights = {"transformer.wpe.weight": model.wpe.weight}
    parts: dict[str, tuple[Tensor, Tensor]] = {"transformer.ln_f": _norm(model.ln_f)}
    for i, block in enumerate(model.blocks):
        h = f"transformer.h.{i}"
        parts |= {
            f"{h}.ln_1": _norm(block.ln1),
            f"{h}.attn.c_attn": _linear(block.attn.qkv),  # q, k, v side by side in both
            f"{h}.attn.c_proj": _linear(block.attn.proj),
            f"{h}.ln_2": _norm(block.ln2),
            f"{h}.mlp.c_fc": _linear(block.mlp.fc),
            f"{h}.mlp.c_proj": _linear(block.mlp.proj),
        }
    for name, (weight, bias) in parts.items():
        weights[f"{name}.weight"], weights[f"{name}.bias"] = weight, bias
    return hf_weights(model, "transformer.wte.weight", weights)


register_exporter(GPT, "GPT2LMHeadModel", "GPT2Config", gpt2_config, gpt2_weights)
