"""GPT-2 (Radford et al., 2019) as written in nanoGPT: pre-norm blocks, learned positions, GELU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lmlab.models.attention import AttentionLM, CausalSelfAttention, positions
from lmlab.models.base import padded_vocab_size
from lmlab.models.moe_config import MoEConfig
from lmlab.models.state import KVCache


class MLP(nn.Module):
    """Position-wise feed-forward, 4x wide with GELU; dropout on its output."""

    def __init__(self, d_model: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * d_model, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """x = x + attn(ln1(x)); x = x + mlp(ln2(x)). Pre-norm keeps an identity path from input to
    output, which is why deep GPTs train without the warm-up post-norm needs. `mlp` is an MLP or a
    mixture of MLP experts."""

    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool, mlp: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_head, dropout, bias=bias)
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
    load-balancing loss. The defaults are conf/model/gpt.yaml's.
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
    ) -> None:
        super().__init__(vocab_size, d_model, n_layer, n_head, dropout, block_size, pad_vocab_to)
        moe = MoEConfig.of(moe)
        moe.check(n_layer)

        def mlp(layer: int) -> nn.Module:
            return moe.feed_forward(layer, lambda: MLP(d_model, dropout, bias), d_model)

        n_rows = padded_vocab_size(vocab_size, pad_vocab_to)
        self.wte = nn.Embedding(n_rows, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout, bias, mlp(i)) for i in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, n_rows, bias=False)
        # weight tying: the output layer reuses the token embedding (Press & Wolf, 2017)
        self.wte.weight = self.lm_head.weight
        self.init_gpt2()

    def forward(self, idx: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache | None]:
        pos = positions(idx, state, self.context_length)
        x = self.run_blocks(self.drop(self.wte(idx) + self.wpe(pos)), state)
        return self._unpad(self.lm_head(self.ln_f(x))), state
