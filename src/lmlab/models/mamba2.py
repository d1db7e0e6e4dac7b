"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): Mamba with a scalar decay per head, computed
in chunks of matmuls (ssd.py) instead of an elementwise scan.

Against Mamba-1: A is one number per head (not a d_inner x d_state matrix), so the state update is
a multi-head recurrence whose chunks are masked matmuls; B and C are shared by groups of heads (like
grouped-query attention's keys and values) and come from the input projection in parallel with x,
not from x after the convolution; the convolution runs over x, B and C together; and the output is
normalised (RMSNorm gated by silu(z)) before out_proj, which keeps large states stable. The state
stays a constant size, so generation cost per token does not grow with the context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.models.base import LanguageModel, check_choice, check_dropout, check_sizes, padded_vocab_size
from lmlab.models.kernels import fla_refusal, fla_ssd
from lmlab.models.mamba import MambaBlock, init_residual_stack, run_ssm_stack, stack_states
from lmlab.models.ssd import ssd_chunked, ssd_step
from lmlab.models.state import SSMCache

# fla: flash-linear-attention's fused SSD for CUDA inputs (the optional fla-core wheel); torch: the
# pure-PyTorch SSD. auto is torch until fla is measured to win on a GPU (docs/perf.md)
KERNELS = ("auto", "fla", "torch")


def check_mamba2(
    d_model: int,
    d_state: int,
    d_conv: int,
    expand: int,
    n_head: int,
    n_groups: int,
    chunk_size: int,
    head_key: str = "n_head",
    kernels: str = "auto",
) -> None:
    """The head split, the B/C groups and the chunk length must fit together; one line naming the key
    (`head_key`: the SSM's head count is Jamba's `ssm_n_head`, as its `n_head` counts attention heads)."""
    check_sizes(
        d_state=d_state, d_conv=d_conv, expand=expand, **{head_key: n_head}, n_groups=n_groups, chunk_size=chunk_size
    )
    d_inner = expand * d_model
    if d_inner % n_head != 0:
        raise ValueError(
            f"{head_key} must divide d_inner = expand x d_model = {d_inner} (got {head_key}={n_head}): "
            f"set model.{head_key} to a divisor of {d_inner}, or change model.d_model or model.expand"
        )
    if n_head % n_groups != 0:
        raise ValueError(
            f"n_groups must divide {head_key}={n_head} (got n_groups={n_groups}): each group's B and C serve "
            f"{head_key} / n_groups heads; set model.n_groups to a divisor of {n_head}"
        )
    if chunk_size & (chunk_size - 1) != 0:
        raise ValueError(f"chunk_size must be a power of two (got {chunk_size}): set model.chunk_size to e.g. 64")
    check_choice("kernels", kernels, KERNELS)
    if kernels == "fla" and fla_ssd() is None:
        raise ValueError(
            "kernels=fla needs flash-linear-attention's kernels, which do not import here: "
            "pip install fla-core (a wheel, Triton only), or set model.kernels=torch"
        )
    if kernels == "fla" and (reason := fla_refusal()) is not None:
        raise ValueError(
            f"kernels=fla cannot train here: {reason}; pip install 'triton>=3.7.1' or set model.kernels=torch"
        )


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)), per group of channels (Mamba-2's norm before out_proj): each group of
    heads is normalised on its own, so the layer splits across devices by group as the paper's does."""

    def __init__(self, d_inner: int, n_groups: int, eps: float) -> None:
        super().__init__()
        self.n_groups, self.eps = n_groups, eps
        self.weight = nn.Parameter(torch.ones(d_inner))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        gated = y.float() * F.silu(z.float())
        grouped = gated.unflatten(-1, (self.n_groups, -1))
        normed = F.rms_norm(grouped, grouped.shape[-1:], eps=self.eps).flatten(-2)
        return (normed * self.weight.float()).to(z.dtype)


class Mamba2Mixer(nn.Module):
    """in_proj -> (z, x|B|C, dt); causal depthwise conv + silu on x|B|C; SSD; + D x; gated RMSNorm; out_proj.

    Interface of MambaMixer: forward(x, conv_state, ssm_state) -> (y, conv_state, ssm_state), so
    Mamba's block and Jamba's layers take either. The conv state is the last d_conv-1 inputs of the
    convolution [B, d_inner + 2 n_groups d_state, d_conv-1], the SSM state [B, n_heads, head_dim, d_state].
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        n_head: int = 4,
        n_groups: int = 1,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        # looked up when built, not in forward(), which torch.compile traces
        self.fused_ssd = fla_ssd() if kernels == "fla" else None
        self.d_inner, self.d_state, self.d_conv = expand * d_model, d_state, d_conv
        self.n_heads, self.n_groups, self.chunk_size = n_head, n_groups, chunk_size
        self.head_dim = self.d_inner // n_head
        self.conv_dim = self.d_inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim)  # padded by hand: causal
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, n_groups, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._init_ssm(dt_min, dt_max)

    @torch.no_grad()
    def _init_ssm(self, dt_min: float, dt_max: float) -> None:
        """The paper's init: A uniform in [1, 16] per head (stored as log A, so -exp keeps it negative),
        step sizes log-uniform in [dt_min, dt_max] through the inverse of softplus."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        u = torch.rand_like(self.dt_bias)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(
        self, x: Tensor, conv_state: Tensor | None = None, ssm_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, d_model], continuing from conv_state and ssm_state (None: from zeros). A single
        token (generation) takes one recurrence step; longer inputs the chunked form."""
        batch, length, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc = xbc.transpose(1, 2)  # [B, conv_dim, T] for the convolution
        if conv_state is None:  # zeros: the same as left zero padding
            conv_state = xbc.new_zeros(batch, self.conv_dim, self.d_conv - 1)
        xbc = torch.cat([conv_state.to(xbc.dtype), xbc], dim=-1)
        new_conv_state = xbc[:, :, xbc.size(-1) - (self.d_conv - 1) :]
        xbc = F.silu(F.conv1d(xbc, self.conv.weight, self.conv.bias, groups=self.conv_dim)).transpose(1, 2)
        u, b, c = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        u = u.unflatten(-1, (self.n_heads, self.head_dim))
        b, c = (t.unflatten(-1, (self.n_groups, self.d_state)) for t in (b, c))

        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, T, H]
        decay = dt * -torch.exp(self.A_log.float())  # log of each step's decay, < 0
        inputs = u.float() * dt[..., None]
        if ssm_state is None:
            ssm_state = inputs.new_zeros(batch, self.n_heads, self.head_dim, self.d_state)
        if length == 1:
            y, ssm_state = ssd_step(inputs[:, 0], decay[:, 0], b[:, 0], c[:, 0], ssm_state)
            y = y[:, None]
        elif self.fused_ssd is not None and x.is_cuda:
            y, ssm_state = self.fused_ssd(inputs, decay, b, c, ssm_state)
        else:
            y, ssm_state = ssd_chunked(inputs, decay, b, c, self.chunk_size, ssm_state)
        y = y + u.float() * self.D.float()[:, None]
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y), new_conv_state, ssm_state

    def empty_states(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Zero conv state (in the model's dtype) and SSM state (fp32, like the SSD's sums)."""
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype)
        ssm = torch.zeros(batch_size, self.n_heads, self.head_dim, self.d_state, device=device, dtype=torch.float32)
        return conv, ssm

    def mixing_flops(self, seq_len: int | None) -> int:
        """Forward FLOPs per token of the SSD beyond the weights, with chunk length Q = min(chunk_size,
        seq_len): C B^T against the Q steps of its chunk (2 Q n_groups d_state), the weighted sum of
        their inputs (2 Q d_inner), writing the chunk state and reading the carried one (2 x 2 d_inner
        d_state). Like attention's 4 d_model T, the causal half of the chunk is counted in full."""
        q = self.chunk_size if seq_len is None else min(self.chunk_size, seq_len)
        return 2 * q * (self.n_groups * self.d_state + self.d_inner) + 4 * self.d_inner * self.d_state


def empty_mamba2_cache(
    mixers: list[Mamba2Mixer], batch_size: int, device: torch.device | str, dtype: torch.dtype
) -> SSMCache:
    """Zero states of `mixers` (all of one shape), stacked over layers: conv [n, B, conv_dim, d_conv-1],
    SSM [n, B, n_heads, head_dim, d_state]."""
    conv, ssm = zip(*(m.empty_states(batch_size, device, dtype) for m in mixers), strict=True)
    return stack_states(list(conv), list(ssm))


class Mamba2(LanguageModel):
    """Embedding -> n_layer pre-norm blocks of Mamba2Mixer -> RMSNorm -> (tied) output layer. No context limit.

    Like Mamba it always returns its state (an SSMCache of conv and SSM states), so truncated BPTT
    (data.stateful) and generation carry it. `n_head` splits d_inner = expand x d_model into heads,
    each with its own decay (the paper fixes head_dim = 64 and derives the count; lmlab's families
    name heads by count, so widths stay multiples of it); `n_groups` groups of heads share B and C;
    `chunk_size` (a power of two) is the length of the matmul blocks of the SSD; `kernels` picks
    flash-linear-attention's fused SSD on a GPU (kernels/fla_ssd.py). These defaults are
    model=mamba2's.
    """

    block_types = (MambaBlock,)  # Mamba's block, holding a Mamba-2 mixer
    carries_state = True

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layer: int = 3,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        n_head: int = 4,
        n_groups: int = 1,
        chunk_size: int = 64,
        dropout: float = 0.0,
        tie_weights: bool = True,
        norm_eps: float = 1e-5,
        pad_vocab_to: int = 1,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        check_sizes(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, pad_vocab_to=pad_vocab_to)
        check_mamba2(d_model, d_state, d_conv, expand, n_head, n_groups, chunk_size, kernels=kernels)
        check_dropout(dropout)
        self.vocab_size, self.context_length = vocab_size, None
        self.d_model, self.n_layer, self.n_head = d_model, n_layer, n_head

        n_rows = padded_vocab_size(vocab_size, pad_vocab_to)
        self.wte = nn.Embedding(n_rows, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            MambaBlock(
                d_model,
                Mamba2Mixer(d_model, d_state, d_conv, expand, n_head, n_groups, chunk_size, norm_eps, kernels=kernels),
                dropout,
                norm_eps,
            )
            for _ in range(n_layer)
        )
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, n_rows, bias=False)
        init_residual_stack(self, n_layer)
        if tie_weights:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor, state: SSMCache | None = None) -> tuple[Tensor, SSMCache]:
        return run_ssm_stack(self, idx, state)

    def init_state(self, batch_size: int, device: torch.device | str) -> SSMCache:
        return empty_mamba2_cache([b.mixer for b in self.blocks], batch_size, device, self.wte.weight.dtype)

    def mixing_flops(self, seq_len: int | None) -> int:
        return sum(block.mixer.mixing_flops(seq_len) for block in self.blocks)
