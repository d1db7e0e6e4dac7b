"""lmlab's Mamba as transformers' MambaForCausalLM.

Both follow the reference mamba_simple layer (in_proj -> causal depthwise conv -> silu -> selective
scan gated by silu(z) -> out_proj, pre-norm RMSNorm blocks), so every tensor maps one to one; only
the names differ. lmlab's convolution has a bias and its projections have none, as transformers'
defaults (use_conv_bias=True, use_bias=False) expect.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lmlab.export.gpt2 import hf_weights
from lmlab.export.registry import register_exporter
from lmlab.models.mamba import Mamba


def mamba_config(model: Mamba) -> dict[str, Any]:
    """MambaConfig's settings for `model`."""
    mixer = model.blocks[0].mixer
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "state_size": mixer.d_state,
        "num_hidden_layers": model.n_layer,
        "layer_norm_epsilon": model.norm.eps,
        "expand": mixer.d_inner // model.d_model,
        "conv_kernel": mixer.d_conv,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "time_step_rank": mixer.dt_rank,
        "tie_word_embeddings": model.lm_head.weight is model.wte.weight,
    }


def mamba_weights(model: Mamba) -> dict[str, Tensor]:
    """MambaForCausalLM's state dict holding `model`'s weights."""
    weights = {"backbone.norm_f.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        layer, mixer = f"backbone.layers.{i}", block.mixer
        weights |= {
            f"{layer}.norm.weight": block.norm.weight,
            f"{layer}.mixer.A_log": mixer.A_log,
            f"{layer}.mixer.D": mixer.D,
            f"{layer}.mixer.conv1d.weight": mixer.conv.weight,
            f"{layer}.mixer.conv1d.bias": mixer.conv.bias,
            f"{layer}.mixer.in_proj.weight": mixer.in_proj.weight,
            f"{layer}.mixer.x_proj.weight": mixer.x_proj.weight,
            f"{layer}.mixer.dt_proj.weight": mixer.dt_proj.weight,
            f"{layer}.mixer.dt_proj.bias": mixer.dt_proj.bias,
            f"{layer}.mixer.out_proj.weight": mixer.out_proj.weight,
        }
    return hf_weights(model, "backbone.embeddings.weight", weights)


register_exporter(Mamba, "MambaForCausalLM", "MambaConfig", mamba_config, mamba_weights)
