"""A Jamba-style hybrid (Lieber et al. 2024): Mamba layers with an attention layer every `attn_every`
layers, and a mixture-of-experts feed-forward on every `moe_every`-th layer.

Mamba layers carry most of the sequence mixing at a fixed state size; the few attention layers
give exact recall over the context. Every layer is two pre-norm residual sub-layers, a mixer
(attention or Mamba) and a feed-forward (SwiGLU or MoE). No position encoding: the Mamba layers
order the tokens, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lmlab.models.attention import GroupedQueryAttention, check_attention, check_kv_heads, positions
from lmlab.models.base import LanguageModel, check_choice, check_period, padded_vocab_size
from lmlab.models.ffn import SwiGLU, swiglu_hidden
from lmlab.models.mamba import (
    MambaMixer,
    check_mamba,
    empty_ssm_cache,
    init_residual_stack,
    layer_states,
    stack_states,
)
from lmlab.models.mamba2 import Mamba2Mixer, check_mamba2, empty_mamba2_cache
from lmlab.models.moe_config import MoEConfig
from lmlab.models.state import HybridCache, KVCache, SSMCache

SSM_LAYERS = ("mamba", "mamba2")


class JambaLayer(nn.Module):
    """x = x + drop(mixer(norm1(x))); x = x + mlp(norm2(x)). The model hands the mixer its state."""

    def __init__(self, d_model: int, mixer: nn.Module, mlp: nn.Module, dropout: float, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model, eps=norm_eps)
        self.mixer = mixer
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.RMSNorm(d_model, eps=norm_eps)
        self.mlp = mlp

    @property
    def is_attention(self) -> bool:
        return isinstance(self.mixer, GroupedQueryAttention)

    def forward(self, x: Tensor, *mixer_state: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
        """`mixer_state` is what the mixer continues from: (KV cache, index among the attention
        layers) for attention, (conv state, SSM state) for Mamba. Returns the new x and the Mamba
        mixer's new (conv, ssm) states; () for attention, whose cache is updated in place."""
        h = self.norm1(x)
        if self.is_attention:
            h, new_state = self.mixer(h, *mixer_state), ()
        else:
            h, *new_state = self.mixer(h, *mixer_state)
        x = x + self.drop(h)
        return x + self.mlp(self.norm2(x)), tuple(new_state)


class Jamba(LanguageModel):
    """Layer i is attention when i % attn_every == attn_offset (Jamba: 1 in 8, offset 4), Mamba
    otherwise; n_experts > 0 makes every `moe_every`-th feed-forward a mixture of experts.
    `ssm` picks the state-space layer: `mamba` (Mamba-1, the paper's) or `mamba2` (mamba2.py, with
    `ssm_n_head` heads, n_head when None, `n_groups` and `chunk_size`; `dt_rank`, `scan` and
    `recompute_scan` are Mamba-1's; `kernels` takes either layer's choices).

    Its context is `block_size` (the attention layers' KV cache). Like the attention models it
    returns a state only when given one (init_state: a HybridCache of the attention layers' KV cache
    and the Mamba layers' SSMCache), so generation carries both. These defaults are
    model=jamba's, a small stack; the paper's pattern is attn_every=8, attn_offset=4.
    """

    block_types = (JambaLayer,)

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_kv_head: int | None = 2,
        attn_every: int = 4,
        attn_offset: int = 2,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        d_ff: int | None = None,
        multiple_of: int = 32,
        moe: MoEConfig | Mapping[str, Any] = MoEConfig(n_experts=4, moe_every=2),
        dropout: float = 0.0,
        block_size: int = 64,
        tie_weights: bool = True,
        norm_eps: float = 1e-5,
        scan: str = "auto",
        kernels: str = "auto",
        recompute_scan: bool = True,
        pad_vocab_to: int = 1,
        ssm: str = "mamba",
        ssm_n_head: int | None = None,
        n_groups: int = 1,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        check_attention(
            vocab_size,
            d_model,
            n_layer,
            n_head,
            dropout,
            block_size=block_size,
            multiple_of=multiple_of,
            pad_vocab_to=pad_vocab_to,
            **({} if d_ff is None else {"d_ff": d_ff}),
        )
        check_kv_heads(n_head, n_kv_head)
        check_period("attn_every", attn_every, n_layer, "attention")
        if not 0 <= attn_offset < attn_every:
            raise ValueError(
                f"attn_offset must be in [0, attn_every) (got attn_offset={attn_offset}, attn_every={attn_every}): "
                f"set model.attn_offset between 0 and model.attn_every - 1"
            )
        check_choice("ssm", ssm, SSM_LAYERS)
        ssm_n_head = n_head if ssm_n_head is None else ssm_n_head
        check_mamba(d_state, d_conv, expand, dt_rank, scan, kernels if ssm == "mamba" else "auto")
        if ssm == "mamba2":
            check_mamba2(d_model, d_state, d_conv, expand, ssm_n_head, n_groups, chunk_size, "ssm_n_head", kernels)
        moe = MoEConfig.of(moe)
        moe.check(n_layer)
        self.vocab_size, self.context_length = vocab_size, block_size
        self.d_model, self.n_layer, self.n_head, self.n_kv_head = d_model, n_layer, n_head, n_kv_head
        d_ff = swiglu_hidden(d_model, multiple_of) if d_ff is None else d_ff

        def mixer(layer: int) -> nn.Module:
            if layer % attn_every == attn_offset:
                return GroupedQueryAttention(d_model, n_head, n_kv_head, dropout)
            if ssm == "mamba2":
                return Mamba2Mixer(
                    d_model, d_state, d_conv, expand, ssm_n_head, n_groups, chunk_size, norm_eps, kernels=kernels
                )
            return MambaMixer(d_model, d_state, d_conv, expand, dt_rank, scan, kernels, recompute_scan)

        def mlp(layer: int) -> nn.Module:
            return moe.feed_forward(layer, lambda: SwiGLU(d_model, d_ff, dropout), d_model)

        n_rows = padded_vocab_size(vocab_size, pad_vocab_to)
        self.wte = nn.Embedding(n_rows, d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(JambaLayer(d_model, mixer(i), mlp(i), dropout, norm_eps) for i in range(n_layer))
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, n_rows, bias=False)
        init_residual_stack(self, n_layer)
        if tie_weights:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor, state: HybridCache | None = None) -> tuple[Tensor, HybridCache | None]:
        kv = None if state is None else state.kv
        positions(idx, kv, self.context_length)  # the KV cache ends at block_size
        x, conv, ssm, n_attention = self.drop(self.wte(idx)), [], [], 0
        for layer in self.layers:
            if layer.is_attention:
                x, _ = self.call_block(layer, x, kv, n_attention)
                n_attention += 1
            else:
                x, (c, s) = self.call_block(layer, x, *layer_states(None if state is None else state.ssm, len(conv)))
                conv.append(c)
                ssm.append(s)
        logits = self._unpad(self.lm_head(self.norm(x)))
        if state is None:
            return logits, None
        kv.length += idx.size(1)
        return logits, HybridCache(kv, stack_states(conv, ssm) if conv else state.ssm)

    def init_state(self, batch_size: int, device: torch.device | str) -> HybridCache:
        dtype = self.wte.weight.dtype
        n_attention = sum(layer.is_attention for layer in self.layers)
        kv = KVCache(
            n_attention, batch_size, self.n_kv_head, self.d_model // self.n_head, self.context_length, device, dtype
        )
        return HybridCache(kv, self._empty_ssm_states(batch_size, device, dtype))

    def _empty_ssm_states(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> SSMCache:
        mixers = [layer.mixer for layer in self.layers if not layer.is_attention]
        if mixers and isinstance(mixers[0], Mamba2Mixer):
            return empty_mamba2_cache(mixers, batch_size, device, dtype)
        return empty_ssm_cache(mixers, batch_size, device, dtype)

    def mixing_flops(self, seq_len: int | None) -> int:
        """Attention layers: 4 x d_model FLOPs per key over seq_len keys (nanoGPT's convention);
        Mamba layers: their scan (Mamba-2's depends on the chunk length, hence on seq_len)."""
        return sum(self._layer_mixing_flops(layer.mixer, seq_len) for layer in self.layers)

    def _layer_mixing_flops(self, mixer: nn.Module, seq_len: int | None) -> int:
        if isinstance(mixer, GroupedQueryAttention):
            return 4 * self.d_model * seq_len
        return mixer.mixing_flops(seq_len) if isinstance(mixer, Mamba2Mixer) else mixer.mixing_flops()
