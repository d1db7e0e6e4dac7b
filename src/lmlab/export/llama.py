"""lmlab's Llama as transformers' LlamaForCausalLM.

Both rotate channel i with channel i + head_dim/2 (the GPT-NeoX "rotate half" layout), so query and
key weights need no permutation; lmlab's fused key/value projection is split into k_proj and v_proj,
and RoPE position interpolation is transformers' "linear" rope scaling.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lmlab.errors import ConfigError
from lmlab.export.gpt2 import hf_weights
from lmlab.export.registry import register_exporter
from lmlab.models.ffn import SwiGLU
from lmlab.models.llama import Llama


def _check(model: Llama) -> None:
    if not all(isinstance(block.mlp, SwiGLU) for block in model.blocks):
        raise ConfigError(
            "a Llama with mixture-of-experts layers (model.moe.n_experts > 0) has no LlamaForCausalLM equivalent: "
            "export a dense Llama (model.moe.n_experts=0)"
        )
    head_dim = model.blocks[0].attn.head_dim
    if head_dim % 2:
        raise ConfigError(
            f"this Llama's head size is odd ({head_dim}): lmlab leaves its last channel unrotated, transformers "
            "cannot; export a model whose d_model / n_head is even"
        )


def llama_config(model: Llama) -> dict[str, Any]:
    """LlamaConfig's settings for `model`."""
    _check(model)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    scaling = attn.rope_scaling
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": mlp.gate.out_features,
        "num_hidden_layers": model.n_layer,
        "num_attention_heads": model.n_head,
        "num_key_value_heads": model.n_kv_head,
        "head_dim": attn.head_dim,
        "max_position_embeddings": model.context_length,
        "rms_norm_eps": model.norm.eps,
        "rope_theta": attn.rope_base,
        "rope_scaling": {"rope_type": "linear", "factor": scaling} if scaling else None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": attn.dropout,
        "tie_word_embeddings": model.lm_head.weight is model.wte.weight,
    }


def llama_weights(model: Llama) -> dict[str, Tensor]:
    """LlamaForCausalLM's state dict holding `model`'s weights."""
    _check(model)
    weights = {"model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        layer, attn = f"model.layers.{i}", block.attn
        k, v = attn.kv.weight.chunk(2, dim=0)  # lmlab's kv output is [k heads | v heads]
        weights |= {
            f"{layer}.input_layernorm.weight": block.norm1.weight,
            f"{layer}.self_attn.q_proj.weight": attn.q.weight,
            f"{layer}.self_attn.k_proj.weight": k,
            f"{layer}.self_attn.v_proj.weight": v,
            f"{layer}.self_attn.o_proj.weight": attn.proj.weight,
            f"{layer}.post_attention_layernorm.weight": block.norm2.weight,
            f"{layer}.mlp.gate_proj.weight": block.mlp.gate.weight,
            f"{layer}.mlp.up_proj.weight": block.mlp.up.weight,
            f"{layer}.mlp.down_proj.weight": block.mlp.proj.weight,
        }
    return hf_weights(model, "model.embed_tokens.weight", weights)


register_exporter(Llama, "LlamaForCausalLM", "LlamaConfig", llama_config, llama_weights)
