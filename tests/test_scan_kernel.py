"""The fused Triton selective scan equals the step-by-step reference, forward and every gradient, and
Mamba picks it where it should. Without a GPU the kernels run on CPU tensors in Triton's interpreter
(tests/__init__.py sets TRITON_INTERPRET=1 there), so shapes stay tiny: a few seconds a test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmlab.models import Mamba
from lmlab.models.mamba import check_mamba, scan_kernel
from lmlab.models.scan import selective_scan

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
FP32 = dict(atol=1e-4, rtol=1e-4)
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]


@pytest.fixture(scope="module")
def fused():
    pytest.importorskip("triton")
    from lmlab.models.kernels.triton_scan import selective_scan_fused

    return selective_scan_fused


def scan_inputs(batch: int, length: int, channels: int, d_state: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs with Mamba's shapes; dt = softplus(delta + bias) varies by step and channel, and
    A spans slow and fast decays (a step can shrink the state by up to e^-10)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "u": randn(batch, length, channels),
        "delta": randn(batch, length, channels),
        "A": -torch.rand(channels, d_state, generator=g, dtype=torch.float64) * 3 - 0.05,
        "B": randn(batch, length, d_state),
        "C": randn(batch, length, d_state),
        "D": randn(channels),
        "z": randn(batch, length, channels),
        "delta_bias": 0.5 * randn(channels),
        "h0": randn(batch, channels, d_state),
    }


def reference(x: dict[str, torch.Tensor], softplus: bool, with_h0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """models.scan's sequential scan, with dt's bias and softplus applied beforehand in PyTorch."""
    dt = x["delta"] + x["delta_bias"]
    dt = F.softplus(dt) if softplus else dt
    h0 = x["h0"] if with_h0 else None
    return selective_scan(x["u"], dt, x["A"], x["B"], x["C"], x["D"], x["z"], h0, method="sequential")


def outputs_and_grads(scan, x: dict[str, torch.Tensor], use_last_state: bool, seed: int = 1) -> list[torch.Tensor]:
    """y, h_T and the gradient of a random weighting of them (of y alone unless `use_last_state`) for every input."""
    x = {k: v.detach().requires_grad_() for k, v in x.items()}
    y, h = scan(x)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)).sum()
    if use_last_state:
        loss = loss + (h * torch.randn(h.shape, generator=g, dtype=torch.float64).to(h)).sum()
    grads = torch.autograd.grad(loss, list(x.values()), allow_unused=True)
    return [y, h, *(torch.zeros_like(v) if d is None else d for v, d in zip(x.values(), grads))]


@pytest.mark.parametrize(
    "batch, length, channels, d_state, block_t, block_d, softplus, with_h0, use_last_state",
    [
        (2, 13, 12, 5, 4, 8, True, True, True),  # odd length over 4 chunks, a partial channel block, odd d_state
        (1, 1, 3, 1, 4, 8, True, False, True),  # one step, one state dimension
        (2, 9, 8, 16, 8, 8, False, False, False),  # d_state 16; dt used as given; y's gradient alone
        (1, 6, 4, 4, 16, 4, True, True, False),  # a chunk longer than the sequence
    ],
)
def test_kernel_equals_the_sequential_reference(
    fused, batch, length, channels, d_state, block_t, block_d, softplus, with_h0, use_last_state
) -> None:
    """The kernel vs the reference (fp32; its inputs fp64): y, h_T and the gradients of u, delta, A, B, C, D, z, dt's bias, h0."""
    x = scan_inputs(batch, length, channels, d_state)
    if not with_h0:
        del x["h0"]

    def kernel(t):
        t = {k: v.float().to(DEVICE) for k, v in t.items()}
        args = [t[k] for k in NAMES[:7]]
        return fused(*args, t["delta_bias"], t.get("h0"), softplus, block_t=block_t, tiles=[block_d, 2, 2])

    got = outputs_and_grads(kernel, x, use_last_state)
    want = outputs_and_grads(lambda t: reference(t, softplus, with_h0), x, use_last_state)
    for name, g, w in zip(["y", "h_T", *NAMES], got, want):
        torch.testing.assert_close(g.double().cpu(), w.double(), **FP32, msg=lambda m, name=name: f"{name}: {m}")


def test_kernel_keeps_the_input_dtype(fused) -> None:
    """bf16 activations in, bf16 y and activation gradients out; the state and A's gradient stay fp32."""
    x = {k: v.float().to(DEVICE) for k, v in scan_inputs(1, 5, 4, 2).items()}
    low = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v).requires_grad_() for k, v in x.items()}
    y, h = fused(*(low[k] for k in NAMES[:7]), low["delta_bias"], low["h0"], True)
    (y.float().sum() + h.sum()).backward()
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert {k: v.grad.dtype for k, v in low.items()} == {k: v.dtype for k, v in low.items()}
    ref_y, ref_h = reference(x, softplus=True, with_h0=True)
    torch.testing.assert_close(y.float(), ref_y, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(h, ref_h, atol=5e-2, rtol=5e-2)


def test_kernel_compiles_into_one_graph(fused) -> None:
    """torch.compile traces through the custom ops (their fake versions) without a break, gradients included."""
    x = {k: v.float().to(DEVICE) for k, v in scan_inputs(1, 7, 4, 2).items()}

    def scan(t):
        return fused(*(t[k] for k in NAMES[:7]), t["delta_bias"], t["h0"], True, block_t=4, tiles=[4, 1, 1])

    compiled = torch.compile(scan, backend="aot_eager", fullgraph=True)
    for g, w in zip(outputs_and_grads(compiled, x, True), outputs_and_grads(scan, x, True)):
        torch.testing.assert_close(g, w)


def test_custom_ops_pass_opcheck_on_strided_inputs(fused) -> None:
    """The views the model passes (u transposed from the convolution, z and B, C sliced out of
    projections): the fake versions torch.compile traces with give the real kernels' shapes and strides."""
    x = {k: v.float().to(DEVICE) for k, v in scan_inputs(2, 3, 4, 2).items()}
    u = x["u"].transpose(1, 2).contiguous().transpose(1, 2)
    _, z = torch.cat([x["u"], x["z"]], dim=-1).chunk(2, dim=-1)
    B, C = torch.cat([x["B"], x["C"]], dim=-1).split(2, dim=-1)
    args = [u, x["delta"], x["A"], B, C, x["D"], z, x["delta_bias"], x["h0"]]
    settings = (True, 4, [4, 1, 1])
    forward = torch.ops.lmlab.selective_scan_fwd.default
    torch.library.opcheck(forward, (*(t.detach().requires_grad_() for t in args), *settings))
    states = forward(*args, *settings)[2]
    dout = torch.randn(3, 4, 2, device=DEVICE).permute(2, 0, 1)  # [B, T, D], not contiguous
    backward_args = (*args[:8], states, dout, torch.randn_like(x["h0"]), *settings)
    torch.library.opcheck(torch.ops.lmlab.selective_scan_bwd.default, backward_args)


def mamba_pair(**kw) -> tuple[Mamba, Mamba]:
    torch.manual_seed(0)
    sizes = dict(vocab_size=11, d_model=8, n_layer=2, d_state=4, d_conv=3, **kw)
    reference_model = Mamba(**sizes, kernels="torch", scan="sequential").to(DEVICE)
    triton_model = Mamba(**sizes, kernels="triton").to(DEVICE)
    triton_model.load_state_dict(reference_model.state_dict())
    return reference_model, triton_model


def test_mamba_with_the_kernel_trains_like_the_reference(fused) -> None:
    """Through the model (dt_proj's bias and softplus fused): the same loss and every parameter's gradient."""
    models = mamba_pair()
    idx = torch.randint(0, 11, (2, 10), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    losses = [m(idx)[0].logsumexp(-1).mean() for m in models]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], **FP32)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q.grad, p.grad, **FP32, msg=lambda m, name=name: f"{name}: {m}")


@torch.no_grad()
def test_mamba_with_the_kernel_continues_from_its_state(fused) -> None:
    """Two calls carrying the SSMCache (the kernel starting from a state) give the one long call's logits."""
    reference_model, model = (m.eval() for m in mamba_pair())
    idx = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    whole, _ = reference_model(idx)
    first, state = model(idx[:, :5], model.init_state(2, DEVICE))
    second, _ = model(idx[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, **FP32)


@pytest.mark.parametrize(
    "kernels, device, fresh, available, expected",
    [
        ("auto", "cuda", True, {"triton"}, "triton"),  # auto takes the Triton scan on a GPU
        ("auto", "cuda", True, {"cuda", "triton"}, "cuda"),  # ... after mamba-ssm, where installed
        ("auto", "cuda", False, {"cuda", "triton"}, "triton"),  # mamba-ssm's kernel starts from zero only
        ("auto", "cuda", True, set(), "torch"),
        ("auto", "cpu", True, {"cuda", "triton"}, "torch"),  # never on a CPU
        ("triton", "cuda", True, {"cuda", "triton"}, "triton"),
        ("cuda", "cuda", False, {"cuda", "triton"}, "torch"),
        ("torch", "cuda", True, {"cuda", "triton"}, "torch"),
    ],
)
def test_which_scan_runs(kernels, device, fresh, available, expected) -> None:
    assert scan_kernel(kernels, torch.device(device), fresh, available) == expected


def test_triton_on_a_cpu_runs_only_in_the_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert scan_kernel("triton", torch.device("cpu"), True, {"triton"}) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert scan_kernel("triton", torch.device("cpu"), True, {"triton"}) == "triton"


def test_kernels_triton_refused_where_triton_does_not_import(monkeypatch) -> None:
    monkeypatch.setattr("lmlab.models.mamba.triton_selective_scan", lambda: None)
    with pytest.raises(ValueError, match="model.kernels=auto") as info:
        check_mamba(4, 3, 2, None, "auto", "triton")
    assert "kernels=triton needs the triton package" in str(info.value) and "\n" not in str(info.value)


def test_narrower_tiles_for_a_small_batch(fused, monkeypatch) -> None:
    """At batch 8 x 1536 channels an H100's 132 multiprocessors get 768 programs of 16 channels; a batch
    of one gets programs of 4 channels (384 of them), with the warps cut in proportion."""
    from lmlab.models.kernels.triton_scan import default_tiles

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    assert default_tiles(8, 1536, torch.device("cuda")) == [16, 8, 4]
    assert default_tiles(4, 1536, torch.device("cuda")) == [8, 4, 2]
    assert default_tiles(1, 1536, torch.device("cuda")) == [4, 2, 1]


@needs_gpu
@pytest.mark.parametrize("tiles", [None, [16, 8, 4], [4, 2, 1]])
def test_kernel_at_a_training_shape_on_the_gpu(fused, tiles) -> None:
    """Many chunks and channel blocks: the kernel vs the reference on the GPU."""
    x = scan_inputs(2, 1000, 192, 16)
    got = outputs_and_grads(lambda t: fused(*(t[k].float().cuda() for k in NAMES), True, tiles=tiles), x, True)
    want = outputs_and_grads(lambda t: reference({k: v.cuda() for k, v in t.items()}, True, True), x, True)
    for name, g, w in zip(["y", "h_T", *NAMES], got, want):
        torch.testing.assert_close(
            g.double(), w.double(), atol=1e-3, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}"
        )


@needs_gpu
def test_compiled_mamba_on_the_gpu_uses_the_kernel(fused) -> None:
    """kernels=auto under torch.compile (inductor) and bf16 autocast trains like the pure-PyTorch scan."""
    torch.manual_seed(0)
    reference_model = Mamba(11, d_model=64, n_layer=2, kernels="torch").cuda()
    model = Mamba(11, d_model=64, n_layer=2, kernels="auto").cuda()
    model.load_state_dict(reference_model.state_dict())
    assert scan_kernel("auto", torch.device("cuda"), True, model.blocks[0].mixer.fused_scans) in ("triton", "cuda")
    idx = torch.randint(0, 11, (2, 256), device="cuda")
    losses = []
    for m in (reference_model, torch.compile(model)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(idx)[0].flatten(0, 1).float(), idx.flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=2e-2)
    for (name, p), q in zip(reference_model.named_parameters(), model.parameters()):
        assert (q.grad - p.grad).norm() <= 0.05 * p.grad.norm(), name  # bf16 matmuls on both sides
