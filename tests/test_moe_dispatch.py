"""Mixture-of-experts dispatch with a capacity: static shapes, the dropless numbers when nothing overflows,
overflowing slots dropped in a causal order, no graph breaks under torch.compile(fullgraph=True)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

from lmlab.models import GPT, Jamba, Llama, MoEConfig
from lmlab.models.moe import CapacityMoE, MoE

D, E = 8, 4


def expert() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))


def make(top_k: int = 2, capacity_factor: float | None = None, seed: int = 0) -> MoE:
    """The dropless MoE, or with a capacity factor the CapacityMoE: the same weights from the same seed."""
    torch.manual_seed(seed)
    if capacity_factor is None:
        return MoE(D, E, top_k, 0.01, expert)
    return CapacityMoE(D, E, top_k, 0.01, expert, capacity_factor)


def inputs(batch: int = 3, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed))


def output_loss_grads(moe: MoE, x: torch.Tensor):
    moe.zero_grad()
    x = x.clone().requires_grad_(True)
    out = moe(x)
    (out.square().sum() + moe.weighted_loss).backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters()}
    return out.detach(), moe.weighted_loss.detach(), grads, x.grad


def reference_with_capacity(moe: MoE, x: torch.Tensor, capacity: int) -> torch.Tensor:
    """Slot by slot in the documented order (choice, then position, then batch row), each expert
    taking slots until its capacity is full: the definition the dispatch must match."""
    batch, length, _ = x.shape
    probs = moe.router(x).float().softmax(-1)
    top_p, top_e = probs.topk(moe.top_k, dim=-1)
    weights = top_p / top_p.sum(-1, keepdim=True)
    taken = [0] * len(moe.experts)
    out = torch.zeros_like(x)
    for choice in range(moe.top_k):
        for t in range(length):
            for b in range(batch):
                e = int(top_e[b, t, choice])
                if taken[e] < capacity:
                    taken[e] += 1
                    out[b, t] += weights[b, t, choice] * moe.experts[e](x[b, t])
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_dispatch_equals_the_dropless_loop_when_nothing_overflows(top_k):
    dropless = make(top_k).train()
    dispatched = make(top_k, capacity_factor=E / top_k).train()  # capacity = every token: nothing can overflow
    x = inputs()
    assert dispatched.capacity(15) == 15
    out, aux, grads, x_grad = output_loss_grads(dispatched, x)
    ref_out, ref_aux, ref_grads, ref_x_grad = output_loss_grads(dropless, x)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux, ref_aux)  # the load-balancing loss is the same
    torch.testing.assert_close(x_grad, ref_x_grad, atol=1e-6, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("capacity_factor", [0.3, 0.6, 1.0])
def test_overflowing_slots_are_dropped_in_causal_order(capacity_factor):
    moe = make(2, capacity_factor).train()
    x = inputs(seed=2)
    capacity = math.ceil(capacity_factor * 2 * 15 / E)
    assert moe.capacity(15) == capacity
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference_with_capacity(moe, x, capacity), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_tokens_past_a_full_expert_get_no_expert_output():
    moe = make(1, capacity_factor=0.5).train()  # capacity ceil(0.5 x 6 / 4) = 1 per expert
    moe.router.weight.zero_()
    moe.router.weight[0] = 1.0  # positive inputs: every token prefers expert 0
    x = inputs(batch=2, length=3).abs() + 0.1
    out = moe(x)
    torch.testing.assert_close(out[0, 0], moe.experts[0](x[0, 0]))  # first in line: position 0, row 0
    assert torch.count_nonzero(out.flatten(0, 1)[1:]) == 0  # everyone else passes through the residual only
    assert moe.weighted_loss > moe.aux_loss_weight  # the concentrated load is still penalised


@torch.no_grad()
def test_eval_mode_drops_nothing():
    moe = make(2, capacity_factor=0.3).eval()
    dropless = make(2).eval()
    x = inputs()
    torch.testing.assert_close(moe(x), dropless(x), atol=1e-6, rtol=1e-5)


def test_no_graph_breaks_under_fullgraph_compile():
    torch._dynamo.reset()
    moe = make(2, capacity_factor=1.25).train()
    compiled = torch.compile(copy.deepcopy(moe), fullgraph=True, backend="aot_eager")
    x = inputs()
    out, aux, grads, _ = output_loss_grads(compiled, x)
    ref_out, ref_aux, ref_grads, _ = output_loss_grads(moe, x)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux, ref_aux)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[f"_orig_mod.{name}"], grad, atol=1e-6, rtol=1e-5)


def test_every_shape_is_known_before_the_data():
    """Under fake tensors (shapes without values) the capacity path runs, forward and backward: no
    op's output shape and no branch depends on a value, so nothing has to wait for the device. The
    dropless loop cannot run there: nonzero's output size is data."""
    x = inputs()
    with FakeTensorMode(allow_non_fake_inputs=True):
        moe = make(2, capacity_factor=1.25).train()
        out = moe(x)
        (out.sum() + moe.weighted_loss).backward()
        assert out.shape == x.shape
        with pytest.raises(DynamicOutputShapeException, match="nonzero"):
            make(2).train()(x)


def test_models_with_a_capacity_have_static_shapes():
    sizes = dict(d_model=16, n_layer=2, block_size=8)
    for capacity_factor, dynamic in ((None, True), (1.25, False)):
        moe = {"n_experts": 4, "capacity_factor": capacity_factor}
        assert GPT(50, n_head=2, moe=moe, **sizes).has_data_dependent_shapes() is dynamic
        assert Llama(50, n_head=2, moe=moe, **sizes).has_data_dependent_shapes() is dynamic
        jamba = Jamba(50, n_head=2, attn_every=2, attn_offset=1, moe={**moe, "moe_every": 2}, **sizes)
        assert jamba.has_data_dependent_shapes() is dynamic
        # the same parameter names either way, so a checkpoint loads into both
        names = {n for n, _ in GPT(50, n_head=2, moe={"n_experts": 4}, **sizes).named_parameters()}
        assert {n for n, _ in GPT(50, n_head=2, moe=moe, **sizes).named_parameters()} == names


@pytest.mark.parametrize("bad", [0, -1.0])
def test_a_capacity_factor_that_is_not_positive_is_refused(bad):
    with pytest.raises(ValueError, match=f"capacity_factor must be > 0 \\(got {bad}\\): set model.moe.capacity_factor"):
        MoEConfig(n_experts=4, capacity_factor=bad).check(n_layer=2)
