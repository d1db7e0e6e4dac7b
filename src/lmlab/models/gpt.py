"""GPT-2 (Radford et al., 2019) as written in nanoGPT: pre-norm blocks, learned positions, GELU.

Options from the modded-nanogpt speedrun, each off by default (the model is then GPT-2's, number for
number): `qk_norm`, `relu_squared`, `zero_init_projections`, `logit_softcap` and `tie_weights=false`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.models.attention import AttentionLM, CausalSelfAttention, attend, positions
from lmlab.models.base import padded_vocab_size
from lmlab.models.moe_config import MoEConfig
from lmlab.models.state import KVCache


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, Primer): as cheap as ReLU, smooth at 0, and trains faster than GELU."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    """Position-wise feed-forward, 4x wide with GELU (or relu^2); dropout on its output."""

    def __init__(self, d_model: int, dropout: float, bias: bool, relu_squared: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.activation = ReLUSquared() if relu_squared else nn.GELU()
        self.proj = nn.Linear(4 * d_model, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.activation(self.fc(x))))


class QKNormAttention(CausalSelfAttention):
    """Multi-head causal attention with each head's queries and keys RMS-normalised (no gain) before
    their dot product: the attention logits stay bounded however the weights grow, which lets a large
    learning rate (Muon's) train without the logits blowing up (Dehghani et al. 2023; modded-nanogpt)."""

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        y = attend(q, k, v, cache, layer, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Block(nn.Module):
    """x = x + attn(ln1(x)); x = x + mlp(ln2(x)). Pre-norm keeps an identity path from input to
    output, which is why deep GPTs train without the warm-up post-norm needs. `mlp` is an MLP or a
    mixture of MLP experts."""

    def __init__(
        self, d_model: int, n_head: int, dropout: float, bias: bool, mlp: nn.Module, qk_norm: bool = False
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = (QKNormAttention if qk_norm else CausalSelfAttention)(d_model, n_head, dropout, bias=bias)
        self.ln2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = mlp

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class GPT(AttentionLM):
    """Token + learned position embeddings, pre-norm blocks, final LayerNorm, tied lm_head.

    bias=False drops the biases of linear layers and LayerNorms: a little faster, no worse.
    `moe` (MoEConfig, or its mapping) with n_experts > 0 replaces the MLP of every `moe_every`-th block
    by `n_experts` MLPs, each token routed to `top_k` of them (moe.py); aux_loss() then returns their
    load-balancing loss. These defaults are model=gpt's.

    The speedrun's options: `qk_norm` RMS-normalises queries and keys; `relu_squared` uses relu^2
    in the MLP; `zero_init_projections` starts the projections that write into the residual stream
    at zero, so each block starts as the identity; `logit_softcap=c` squashes the logits into (-c, c)
    by c tanh(logits / c) (Gemma 2), which keeps early training from growing overconfident;
    `tie_weights=false` gives the output layer its own matrix.
    """

    block_types = (Block,)

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layer: int = 3,
        n_head: int = 4,
        dropout: float = 0.0,
        block_size: int = 64,
        bias: bool = False,
        pad_vocab_to: int = 1,
        moe: MoEConfig | Mapping[str, Any] = MoEConfig(),
        qk_norm: bool = False,
        relu_squared: bool = False,
        zero_init_projections: bool = False,
        logit_softcap: float | None = None,
        tie_weights: bool = True,
    ) -> None:
        super().__init__(vocab_size, d_model, n_layer, n_head, dropout, block_size, pad_vocab_to)
        moe = MoEConfig.of(moe)
        moe.check(n_layer)
        if logit_softcap is not None and not logit_softcap > 0:
            raise ValueError(
                f"logit_softcap must be > 0 or null (got {logit_softcap}): set model.logit_softcap to e.g. 30, "
                "or null for no cap"
            )
        self.logit_softcap = logit_softcap
        # the options GPT-2's own code lacks (an exporter to GPT2LMHeadModel refuses them)
        self.beyond_gpt2 = [
            name
            for name, on in (("qk_norm", qk_norm), ("relu_squared", relu_squared), ("logit_softcap", logit_softcap))
            if on
        ]

        def mlp(layer: int) -> nn.Module:
            return moe.feed_forward(layer, lambda: MLP(d_model, dropout, bias, relu_squared), d_model)

        n_rows = padded_vocab_size(vocab_size, pad_vocab_to)
        self.wte = nn.Embedding(n_rows, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout, bias, mlp(i), qk_norm) for i in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, n_rows, bias=False)
        if tie_weights:  # the output layer reuses the token embedding (Press & Wolf, 2017)
            self.wte.weight = self.lm_head.weight
        self.init_gpt2()
        if zero_init_projections:
            for name, weight in self.blocks.named_parameters():
                if name.endswith("proj.weight"):  # attention and MLP (or expert) output projections
                    nn.init.zeros_(weight)

    def forward(self, idx: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache | None]:
        pos = positions(idx, state, self.context_length)
        x = self.run_blocks(self.drop(self.wte(idx) + self.wpe(pos)), state)
        logits = self.lm_head(self.ln_f(x))
        if self.logit_softcap is not None:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return self._unpad(logits), state
