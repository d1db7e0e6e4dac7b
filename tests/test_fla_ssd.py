"""flash-linear-attention's fused SSD (models/kernels/fla_ssd.py) equals the pure-PyTorch SSD, forward
and every gradient, and Mamba-2 picks it where it should. The kernel runs on a GPU only (Triton);
without one, or without the optional `fla-core` wheel, only the choice and its refusal are checked."""

from __future__ import annotations

import pytest
import torch

from lmlab.models import Jamba, Mamba2
from lmlab.models.kernels import fla_refusal, fla_ssd
from lmlab.models.ssd import ssd_chunked

needs_fla_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or fla_ssd() is None, reason="needs a GPU and the fla-core wheel"
)
fla_trains_here = pytest.mark.skipif(
    fla_ssd() is None or fla_refusal() is not None, reason="fla refuses its gated backward with this Triton and GPU"
)
VOCAB = 40


def ssd_inputs(length: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """x, a, b, c and a starting state with Mamba-2's shapes (2 groups of 2 heads), on the GPU."""
    g = torch.Generator().manual_seed(seed)
    batch, heads, head_dim, groups, d_state = 2, 4, 32, 2, 16
    x = torch.randn(batch, length, heads, head_dim, generator=g) * 0.5
    a = -torch.rand(batch, length, heads, generator=g) * 0.5  # log decays, dt x A
    b, c = (torch.randn(batch, length, groups, d_state, generator=g) * 0.5 for _ in range(2))
    state = torch.randn(batch, heads, head_dim, d_state, generator=g)
    return [t.to("cuda", dtype if i in (0, 2, 3) else torch.float32) for i, t in enumerate((x, a, b, c, state))]


def forward_and_grads(ssd, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y, final = ssd(*inputs)
    g = torch.Generator(device="cuda").manual_seed(1)
    loss = (y.float() * torch.randn(y.shape, device="cuda", generator=g)).sum() + final.float().square().sum()
    loss.backward()
    return [y.float(), final.float()] + [t.grad.float() for t in inputs]


def torch_ssd(x, a, b, c, state):
    return ssd_chunked(x, a, b, c, 16, state)


@needs_fla_gpu
@pytest.mark.parametrize("length", [64, 100, 257])
def test_fla_ssd_forward_equals_pytorch_ssd(length):
    with torch.no_grad():
        exact = torch_ssd(*[t.double() for t in ssd_inputs(length, torch.float32)])
        fused = fla_ssd()(*ssd_inputs(length, torch.float32))
    for got, want in zip(fused, exact, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@needs_fla_gpu
@fla_trains_here
@pytest.mark.parametrize("length", [64, 100, 257])
def test_fla_ssd_equals_pytorch_ssd_forward_and_gradients(length):
    """fp32: within tensor-core (tf32) rounding; bf16: no further from the fp64 reference than the
    PyTorch SSD's own bf16 result is."""
    exact = forward_and_grads(torch_ssd, [t.double() for t in ssd_inputs(length, torch.float32)])
    for got, want in zip(forward_and_grads(fla_ssd(), ssd_inputs(length, torch.float32)), exact, strict=True):
        torch.testing.assert_close(got, want.float(), atol=2e-2, rtol=2e-2)
    fused = forward_and_grads(fla_ssd(), ssd_inputs(length, torch.bfloat16))
    reference = forward_and_grads(torch_ssd, ssd_inputs(length, torch.bfloat16))
    for name, f, r, e in zip(["y", "final", "dx", "da", "db", "dc", "dstate"], fused, reference, exact, strict=True):
        fused_error, reference_error = (f - e).abs().max().item(), (r - e).abs().max().item()
        assert fused_error <= 2 * reference_error + 1e-3, (name, fused_error, reference_error)


@needs_fla_gpu
@fla_trains_here
def test_mamba2_uses_the_fused_ssd_on_a_gpu_and_matches_pytorch():
    torch.manual_seed(0)
    sizes = dict(d_model=64, n_layer=2, d_state=16, n_head=4, n_groups=2)
    fused, plain = (Mamba2(VOCAB, **sizes, kernels=k).cuda() for k in ("fla", "torch"))
    plain.load_state_dict(fused.state_dict())
    assert fused.blocks[0].mixer.fused_ssd is not None and plain.blocks[0].mixer.fused_ssd is None
    idx = torch.randint(0, VOCAB, (2, 150), device="cuda")
    (logits, state), (ref_logits, ref_state) = fused(idx), plain(idx)
    torch.testing.assert_close(logits, ref_logits, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(state.ssm, ref_state.ssm, atol=2e-2, rtol=2e-2)


def test_kernels_is_a_named_choice_and_fla_is_refused_where_it_does_not_import():
    with pytest.raises(ValueError, match="kernels must be one of auto, fla, torch .*set model.kernels"):
        Mamba2(VOCAB, d_model=32, n_layer=1, kernels="triton")
    with pytest.raises(ValueError, match="kernels must be one of auto, fla, torch"):
        Jamba(VOCAB, d_model=32, n_layer=2, n_head=2, attn_every=2, attn_offset=1, ssm="mamba2", kernels="cuda")
    with pytest.raises(ValueError, match="kernels must be one of auto, torch, triton, cuda"):
        Jamba(VOCAB, d_model=32, n_layer=2, n_head=2, attn_every=2, attn_offset=1, kernels="fla")
    if fla_ssd() is None:
        with pytest.raises(
            ValueError, match="kernels=fla needs flash-linear-attention's kernels.*pip install fla-core"
        ):
            Mamba2(VOCAB, d_model=32, n_layer=1, kernels="fla")


@needs_fla_gpu
@pytest.mark.skipif(fla_refusal() is None, reason="fla trains here")
def test_kernels_fla_is_refused_in_one_line_where_fla_would_stop_mid_training():
    with pytest.raises(ValueError, match=r"kernels=fla cannot train here: .*Triton.*set model.kernels=torch"):
        Mamba2(VOCAB, d_model=32, n_layer=1, kernels="fla")
