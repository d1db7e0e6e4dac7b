"""Mamba (Gu & Dao 2023): a stack of selective state-space blocks, no attention and no positions.

Each block mixes the sequence through a causal depthwise convolution and a selective SSM whose
step size dt and matrices B, C depend on the input, so it can choose what to keep in a state of
fixed size. Generation carries that state (SSMCache): one step per token at a cost that does not
grow with the context, unlike an attention KV cache.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmlab.models.base import LanguageModel, check_choice, check_dropout, check_sizes, padded_vocab_size
from lmlab.models.kernels import triton_runs_on, triton_selective_scan
from lmlab.models.scan import SCANS, selective_scan
from lmlab.models.state import SSMCache

KERNELS = ("auto", "torch", "triton", "cuda")


@functools.cache
def cuda_selective_scan() -> Callable | None:
    """mamba-ssm's fused CUDA scan if that optional package imports, else None (never a dependency)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError, RuntimeError):  # not installed, or built for another CUDA/torch
        return None
    return selective_scan_fn


def check_mamba(d_state: int, d_conv: int, expand: int, dt_rank: int | None, scan: str, kernels: str) -> None:
    check_sizes(d_state=d_state, d_conv=d_conv, expand=expand, **({} if dt_rank is None else {"dt_rank": dt_rank}))
    check_choice("scan", scan, SCANS)
    check_choice("kernels", kernels, KERNELS)
    if kernels == "cuda" and cuda_selective_scan() is None:
        raise ValueError(
            "kernels=cuda needs the mamba-ssm package, which does not import here: "
            "pip install mamba-ssm on a CUDA machine, or set model.kernels=auto"
        )
    if kernels == "triton" and triton_selective_scan() is None:
        raise ValueError(
            "kernels=triton needs the triton package, which does not import here: "
            "pip install triton (PyTorch's CUDA wheels bring it), or set model.kernels=auto"
        )


def fused_scans(kernels: str) -> dict[str, Callable]:
    """The fused scans that import here, by name (`cuda`: mamba-ssm, `triton`), looked up when a layer
    is built rather than in forward(), which torch.compile traces."""
    if kernels == "torch":
        return {}
    found = {"cuda": cuda_selective_scan(), "triton": triton_selective_scan()}
    return {name: fn for name, fn in found.items() if fn is not None}


def scan_kernel(kernels: str, device: torch.device, fresh_state: bool, available: Collection[str]) -> str:
    """Which scan runs: `cuda` (mamba-ssm's kernel: CUDA inputs from a fresh state), `triton` (the
    fused Triton kernel: CUDA inputs, or CPU ones under Triton's interpreter) or `torch`. `auto`
    prefers mamba-ssm where it is installed, then Triton, on a GPU only."""
    on_gpu = device.type == "cuda"
    if kernels in ("auto", "cuda") and on_gpu and fresh_state and "cuda" in available:
        return "cuda"
    if "triton" in available and ((kernels == "triton" and triton_runs_on(device)) or (kernels == "auto" and on_gpu)):
        return "triton"
    return "torch"


class MambaMixer(nn.Module):
    """in_proj -> (causal depthwise conv -> silu -> selective SSM) gated by silu(z) -> out_proj.

    The pure-PyTorch scan materialises [B, T, d_inner, d_state] tensors; `recompute_scan` keeps only
    its [B, T, d_inner] inputs for the backward pass and recomputes the rest there (as mamba-ssm's
    kernel does), trading a second scan for d_state times less activation memory.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        scan: str = "auto",
        kernels: str = "auto",
        recompute_scan: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        self.d_inner, self.d_state, self.d_conv = expand * d_model, d_state, d_conv
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.scan, self.kernels, self.recompute_scan = scan, kernels, recompute_scan
        self.fused_scans = fused_scans(kernels)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner)  # padded by hand: causal
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        # S4D-real init: A = -(1, 2, ..., N) for every channel, stored as log(-A) so A stays negative
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.A_log._no_weight_decay = True  # a decay rate, not a weight: decaying it would shorten every memory
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._init_dt(dt_min, dt_max)

    @torch.no_grad()
    def _init_dt(self, dt_min: float, dt_max: float) -> None:
        """Step sizes start log-uniform in [dt_min, dt_max], through the inverse of softplus, so
        channels begin with memories from ~10 to ~1000 tokens long."""
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        u = torch.rand(self.d_inner, device=self.dt_proj.bias.device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(
        self, x: Tensor, conv_state: Tensor | None = None, ssm_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, d_model]; conv_state [B, d_inner, d_conv-1] and ssm_state [B, d_inner, d_state]
        continue from an earlier call (None: start fresh). Returns the output and both new states."""
        batch = x.size(0)
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = u.transpose(1, 2)  # [B, d_inner, T] for the convolution
        if conv_state is None:  # zeros: the same as left zero padding
            conv_state = u.new_zeros(batch, self.d_inner, self.d_conv - 1)
        u = torch.cat([conv_state.to(u.dtype), u], dim=-1)
        new_conv_state = u[:, :, u.size(-1) - (self.d_conv - 1) :]
        u = F.silu(F.conv1d(u, self.conv.weight, self.conv.bias, groups=self.d_inner)).transpose(1, 2)

        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        kernel = scan_kernel(self.kernels, x.device, ssm_state is None, self.fused_scans)
        if kernel == "triton":  # dt_proj's bias and the softplus are applied inside the kernel
            y, h = self.fused_scans["triton"](
                u,
                F.linear(dt, self.dt_proj.weight),
                A,
                B,
                C,
                self.D,
                z,
                self.dt_proj.bias,
                ssm_state,
                delta_softplus=True,
            )
            return self.out_proj(y), new_conv_state, h
        dt = F.softplus(self.dt_proj(dt))
        if kernel == "cuda":  # mamba-ssm's kernel takes [B, channels, T] and starts from a zero state
            y, h = self.fused_scans["cuda"](
                u.transpose(1, 2).contiguous(),
                dt.transpose(1, 2).contiguous(),
                A,
                B.transpose(1, 2).contiguous(),
                C.transpose(1, 2).contiguous(),
                self.D.float(),
                z.transpose(1, 2).contiguous(),
                return_last_state=True,
            )
            y = y.transpose(1, 2)
        elif self.recompute_scan and torch.is_grad_enabled():  # keep the inputs, recompute the rest
            y, h = checkpoint(selective_scan, u, dt, A, B, C, self.D, z, ssm_state, self.scan, use_reentrant=False)
        else:
            y, h = selective_scan(u, dt, A, B, C, self.D, z, ssm_state, self.scan)
        return self.out_proj(y), new_conv_state, h

    def mixing_flops(self) -> int:
        """Forward FLOPs per token of the scan beyond the weights: 9 x d_inner x d_state, the count
        mamba-ssm uses (discretise, update the state, read it out)."""
        return 9 * self.d_inner * self.d_state


class MambaBlock(nn.Module):
    """x + dropout(mixer(RMSNorm(x))): the pre-norm residual block of the Mamba language model."""

    def __init__(self, d_model: int, mixer: MambaMixer, dropout: float, norm_eps: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mixer = mixer
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, conv_state: Tensor | None, ssm_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        y, conv_state, ssm_state = self.mixer(self.norm(x), conv_state, ssm_state)
        return x + self.drop(y), conv_state, ssm_state


def layer_states(state: SSMCache | None, layer: int) -> tuple[Tensor | None, Tensor | None]:
    """The conv and SSM states of Mamba layer `layer` in `state`; (None, None) starts it fresh."""
    return (None, None) if state is None else (state.conv[layer], state.ssm[layer])


def stack_states(conv: list[Tensor], ssm: list[Tensor]) -> SSMCache:
    return SSMCache(torch.stack(conv), torch.stack(ssm))


class Mamba(LanguageModel):
    """Embedding -> n_layer Mamba blocks -> RMSNorm -> (tied) output layer. No context limit.

    Like RecurrentLM it always returns its state, so truncated BPTT (data.stateful) and generation
    carry it. `scan` picks the pure-PyTorch scan (`auto`: parallel on a GPU, sequential on a CPU,
    where it is faster; both compute the same recurrence); `kernels` a fused one for GPU inputs
    (scan_kernel): `auto` mamba-ssm's CUDA scan when it is installed (from a fresh state), else the
    Triton scan; `triton` or `cuda` insist on one; `torch` never. These defaults are model=mamba's.
    """

    block_types = (MambaBlock,)
    carries_state = True

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layer: int = 3,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dropout: float = 0.0,
        tie_weights: bool = True,
        norm_eps: float = 1e-5,
        scan: str = "auto",
        kernels: str = "auto",
        recompute_scan: bool = True,
        pad_vocab_to: int = 1,
    ) -> None:
        super().__init__()
        check_sizes(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, pad_vocab_to=pad_vocab_to)
        check_mamba(d_state, d_conv, expand, dt_rank, scan, kernels)
        check_dropout(dropout)
        self.vocab_size, self.context_length = vocab_size, None
        self.d_model, self.n_layer = d_model, n_layer

        n_rows = padded_vocab_size(vocab_size, pad_vocab_to)
        self.wte = nn.Embedding(n_rows, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            MambaBlock(
                d_model,
                MambaMixer(d_model, d_state, d_conv, expand, dt_rank, scan, kernels, recompute_scan),
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
        return empty_ssm_cache([b.mixer for b in self.blocks], batch_size, device, self.wte.weight.dtype)

    def mixing_flops(self, seq_len: int | None) -> int:
        return sum(block.mixer.mixing_flops() for block in self.blocks)


def empty_ssm_cache(
    mixers: list[MambaMixer], batch_size: int, device: torch.device | str, dtype: torch.dtype
) -> SSMCache:
    """Zero conv and SSM states for `mixers` (all of one shape); the SSM state is kept in fp32, like the scan."""
    n, m = len(mixers), mixers[0] if mixers else None
    d_inner, d_conv, d_state = (m.d_inner, m.d_conv, m.d_state) if m else (0, 1, 0)
    conv = torch.zeros(n, batch_size, d_inner, d_conv - 1, device=device, dtype=dtype)
    return SSMCache(conv, torch.zeros(n, batch_size, d_inner, d_state, device=device, dtype=torch.float32))


def init_residual_stack(model: nn.Module, n_layer: int) -> None:
    """Embeddings N(0, 0.02); the projections that write into the residual stream (`proj`,
    `out_proj`) scaled by 1/sqrt(n_layer), as n_layer of them add up along it (Mamba's and GPT-2's
    rule). Other layers keep PyTorch's defaults; dt_proj keeps its own init."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.split(".")[-2:] in (["proj", "weight"], ["out_proj", "weight"]):
                weight /= math.sqrt(n_layer)


def run_ssm_stack(model: LanguageModel, idx: Tensor, state: SSMCache | None) -> tuple[Tensor, SSMCache]:
    """The forward of a stack of MambaBlocks (Mamba and Mamba-2 differ only in their mixers): each
    layer reads its own (conv, ssm) state and returns the next one."""
    x, conv, ssm = model.drop(model.wte(idx)), [], []
    for layer, block in enumerate(model.blocks):
        x, c, s = model.call_block(block, x, *layer_states(state, layer))
        conv.append(c)
        ssm.append(s)
    return model._unpad(model.lm_head(model.norm(x))), stack_states(conv, ssm)
