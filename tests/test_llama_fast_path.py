"""Llama's fast path (rotary tables once per forward, rotation in the queries' dtype, grouped keys and
values through SDPA's enable_gqa) computes what the previous per-layer formulation computed, with the
same parameter names, so checkpoints and the Hugging Face export keep working."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import lmlab.models.llama as llama_module
from lmlab.models import Llama
from lmlab.models.attention import attend

VOCAB = 50


def make(**kw) -> Llama:
    torch.manual_seed(0)
    return Llama(VOCAB, **{**dict(d_model=48, n_layer=2, n_head=4, n_kv_head=2, block_size=32), **kw}).eval()


def tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def previous_rope(x, positions, base, scaling):
    """The rotation as it was written before: tables rebuilt per call, the rotation done in fp32."""
    n_pairs = x.size(-1) // 2
    inv_freq = base ** (-torch.arange(n_pairs, dtype=torch.float32) / n_pairs)
    angles = (positions.to(torch.float32) / (scaling or 1.0))[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2, rest = x[..., :n_pairs].float(), x[..., n_pairs : 2 * n_pairs].float(), x[..., 2 * n_pairs :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1) if rest.size(-1) else rotated


def previous_forward(model: Llama, idx: torch.Tensor) -> torch.Tensor:
    """Llama written out plainly: RMSNorm by its formula, keys and values repeated per query head."""

    def rms(norm, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    B, T = idx.shape
    pos = torch.arange(T)
    x = model.wte(idx)
    for block in model.blocks:
        attn, h = block.attn, rms(block.norm1, x)
        q = attn.q(h).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)
        k, v = attn.kv(h).view(B, T, 2, attn.n_kv_head, attn.head_dim).transpose(1, 3).unbind(2)
        q = previous_rope(q, pos, attn.rope_base, attn.rope_scaling)
        k = previous_rope(k, pos, attn.rope_base, attn.rope_scaling)
        repeats = attn.n_head // attn.n_kv_head
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attn.proj(y.transpose(1, 2).reshape(B, T, -1))
        mlp, h = block.mlp, rms(block.norm2, x)
        x = x + mlp.proj(F.silu(mlp.gate(h)) * mlp.up(h))
    return model.lm_head(rms(model.norm, x))


@torch.no_grad()
@pytest.mark.parametrize(
    "settings",
    [{}, {"n_kv_head": 1}, {"n_kv_head": 4}, {"d_model": 36, "n_head": 4}, {"rope_scaling": 2.0}],
    ids=["gqa", "one kv head", "multi-head", "odd head_dim", "rope_scaling"],
)
def test_outputs_equal_the_previous_formulation(settings):
    model = make(**settings)
    idx = tokens(2, 20)
    torch.testing.assert_close(model(idx)[0], previous_forward(model, idx), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_generation_equals_the_full_forward():
    model = make()
    idx = tokens(2, 12)
    full, _ = model(idx)
    state = model.init_state(2, "cpu")
    first, state = model(idx[:, :7], state)
    steps = [first] + [model(idx[:, t : t + 1], state)[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_enable_gqa_equals_repeating_keys_and_values():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    repeated = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), is_causal=True
    )
    torch.testing.assert_close(attend(q, k, v, None, 0, 0.0), repeated, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_rotary_tables_are_built_once_per_forward_whatever_the_depth():
    model = make(n_layer=3)
    with mock.patch.object(llama_module, "rope_tables", wraps=llama_module.rope_tables) as tables:
        model(tokens(1, 5))
    assert tables.call_count == 1


@torch.no_grad()
def test_bf16_autocast_rotates_in_bf16_and_stays_close():
    model = make()
    idx = tokens(2, 16)
    seen = []
    model.blocks[0].attn.register_forward_hook(lambda module, args, out: seen.append(args[3][0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(idx)
    assert seen == [torch.bfloat16]  # the tables come in the dtype the projections give
    torch.testing.assert_close(logits.float(), previous_forward(model, idx), atol=0.1, rtol=0.05)


def test_parameter_names_are_unchanged():
    names = [name for name, _ in make(n_layer=1).named_parameters()]
    assert names == [
        "wte.weight",
        "blocks.0.norm1.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.attn.kv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.norm2.weight",
        "blocks.0.mlp.gate.weight",
        "blocks.0.mlp.up.weight",
        "blocks.0.mlp.proj.weight",
        "norm.weight",
    ]
    assert list(make(n_layer=1).state_dict()) == [*names, "lm_head.weight"]  # no buffers added
