"""lmlab's Mamba-2 as transformers' Mamba2ForCausalLM.

Both follow the reference Mamba-2 layer: in_proj's output is [z | x B C | dt] in that order, the
causal depthwise conv (with bias) and silu run over x B C, dt is softplus(dt + dt_bias), A = -exp(A_log)
is one number per head, D skips each head's input, and y * silu(z) is RMS-normalised per group of
d_inner / n_groups channels before out_proj (transformers' norm_before_gate=False). The blocks are
pre-norm RMSNorm with one epsilon for every norm, as in lmlab. So every tensor maps one to one and no
setting of lmlab's Mamba2 is refused; only the names differ.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lmlab.export.gpt2 import hf_weights
from lmlab.export.registry import register_exporter
from lmlab.models.mamba2 import Mamba2


def mamba2_config(model: Mamba2) -> dict[str, Any]:
    """Mamba2Config's settings for `model`."""
    mixer = model.blocks[0].mixer
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "num_hidden_layers": model.n_layer,
        "state_size": mixer.d_state,
        "expand": mixer.d_inner // model.d_model,
        "num_heads": mixer.n_heads,
        "head_dim": mixer.head_dim,
        "n_groups": mixer.n_groups,
        "conv_kernel": mixer.d_conv,
        "chunk_size": mixer.chunk_size,  # the same sums in the same blocks: the closest float rounding
        "layer_norm_epsilon": model.norm.eps,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "tie_word_embeddings": model.lm_head.weight is model.wte.weight,
    }


def mamba2_weights(model: Mamba2) -> dict[str, Tensor]:
    """Mamba2ForCausalLM's state dict holding `model`'s weights."""
    weights = {"backbone.norm_f.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        layer, mixer = f"backbone.layers.{i}", block.mixer
        weights |= {
            f"{layer}.norm.weight": block.norm.weight,
            f"{layer}.mixer.in_proj.weight": mixer.in_proj.weight,
            f"{layer}.mixer.conv1d.weight": mixer.conv.weight,
            f"{layer}.mixer.conv1d.bias": mixer.conv.bias,
            f"{layer}.mixer.dt_bias": mixer.dt_bias,
            f"{layer}.mixer.A_log": mixer.A_log,
            f"{layer}.mixer.D": mixer.D,
            f"{layer}.mixer.norm.weight": mixer.norm.weight,
            f"{layer}.mixer.out_proj.weight": mixer.out_proj.weight,
        }
    return hf_weights(model, "backbone.embeddings.weight", weights)


register_exporter(Mamba2, "Mamba2ForCausalLM", "Mamba2Config", mamba2_config, mamba2_weights)
