"""Mamba's selective scan fused into one Triton kernel forward and one backward, the state kept on chip.

The pure-PyTorch scan (models/scan.py) writes [B, T, d_inner, d_state] fp32 tensors to memory several
times per layer and is memory-bound. Here each program owns one batch row and BLOCK_D channels and
walks the sequence in chunks of BLOCK_T steps, the way mamba-ssm's CUDA kernel does: a chunk's
inputs ([BLOCK_T, BLOCK_D] and [BLOCK_T, d_state] tiles) are loaded once, the affine maps
h -> exp(dt A) h + dt B u are composed by an associative scan over the chunk in registers, the state
entering the chunk is applied, y = C . h + D u is read out and gated by silu(z), and only the
state leaving the chunk goes on to the next. dt's bias and softplus are applied on load.

Memory: the forward stores the output and each chunk's final state ([B, T / BLOCK_T, d_inner,
d_state], BLOCK_T times less than every state). The backward walks the chunks in reverse, recomputes
a chunk's states from the saved state before it, and runs the adjoint recurrence
dL/dh_t = C_t dy_t + exp(dt_{t+1} A) dL/dh_{t+1} as a reverse scan. Gradients summed over channels
(B, C) or over time and batch (A, D, dt's bias) are written per program and summed by PyTorch, so
results do not depend on the order programs finish in.

The kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the tests check
them without a GPU). They are registered as PyTorch custom ops, so torch.compile treats each as
one opaque call.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e): exp2 is the GPU's native instruction
BLOCK_T = 16  # steps per chunk; the tiles across channels are chosen per call (default_tiles)


@triton.jit
def _compose(a_first, b_first, a_then, b_then):
    """Two affine maps h -> a h + b in time order, as one: (a1, b1) then (a2, b2) is (a1 a2, a2 b1 + b2)."""
    return a_first * a_then, a_then * b_first + b_then


@triton.jit
def _step_sizes(dt_ptr, bias, offs_t, offs_d, mask, stride_t, stride_d, SOFTPLUS: tl.constexpr):
    """dt = softplus(delta + bias) (or delta + bias) on a [BLOCK_T, BLOCK_D] tile, and its pre-activation.
    Positions outside the sequence get dt = 0: exp(0 A) = 1 and dt B u = 0, the identity map."""
    x = tl.load(dt_ptr + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    x = x.to(tl.float32) + bias[None, :]
    dt = tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x) if SOFTPLUS else x  # torch's softplus threshold
    return tl.where(mask, dt, 0.0), x


@triton.jit
def _tile(ptr, offs_t, offs_c, mask, stride_t, stride_c):
    return tl.load(ptr + offs_t[:, None] * stride_t + offs_c[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, h0_ptr,  # inputs
    out_ptr, states_ptr, h_last_ptr,  # outputs
    T, D, N,
    s_ub, s_ut, s_ud, s_dtb, s_dtt, s_dtd, s_zb, s_zt, s_zd, s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn,
    SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B x T x D passes 2**31 at long contexts
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n, local_t = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_T)
    mask_d, mask_n = offs_d < D, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    offs_dn = offs_d[:, None] * N + offs_n[None, :]
    A2 = tl.load(A_ptr + offs_dn, mask=mask_dn, other=0.0) * LOG2E
    skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + b * D * N + offs_dn, mask=mask_dn, other=0.0)
    u_ptr, dt_ptr, z_ptr = u_ptr + b * s_ub, dt_ptr + b * s_dtb, z_ptr + b * s_zb
    B_ptr, C_ptr, out_ptr = B_ptr + b * s_Bb, C_ptr + b * s_Cb, out_ptr + b * T * D
    n_chunks = tl.cdiv(T, BLOCK_T)
    states_ptr += b * (n_chunks + 1) * D * N + offs_dn
    tl.store(states_ptr, h, mask=mask_dn)
    for c in range(0, n_chunks):
        offs_t = c * BLOCK_T + local_t
        mask_t = offs_t < T
        mask_td, mask_tn = mask_t[:, None] & mask_d[None, :], mask_t[:, None] & mask_n[None, :]
        dt, _ = _step_sizes(dt_ptr, bias, offs_t, offs_d, mask_td, s_dtt, s_dtd, SOFTPLUS)
        u = _tile(u_ptr, offs_t, offs_d, mask_td, s_ut, s_ud)
        z = _tile(z_ptr, offs_t, offs_d, mask_td, s_zt, s_zd)
        Bt = _tile(B_ptr, offs_t, offs_n, mask_tn, s_Bt, s_Bn)
        Ct = _tile(C_ptr, offs_t, offs_n, mask_tn, s_Ct, s_Cn)

        a = tl.exp2(dt[:, :, None] * A2[None, :, :])  # [BLOCK_T, BLOCK_D, BLOCK_N]
        bu = (dt * u)[:, :, None] * Bt[:, None, :]
        a_cum, h_zero_start = tl.associative_scan((a, bu), 0, _compose)
        hs = h_zero_start + a_cum * h[None, :, :]  # every state of the chunk, from the one entering it
        y = tl.sum(hs * Ct[:, None, :], axis=2) + skip[None, :] * u
        out = y * z * tl.sigmoid(z)
        tl.store(out_ptr + offs_t[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_td)
        h = tl.sum(tl.where((local_t == BLOCK_T - 1)[:, None, None], hs, 0.0), axis=0)  # steps past T are identities
        tl.store(states_ptr + (c + 1) * D * N, h, mask=mask_dn)
    tl.store(h_last_ptr + b * D * N + offs_dn, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, states_ptr, dout_ptr, dh_last_ptr,  # inputs
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,  # outputs
    Bsz, T, D, N,
    s_ub, s_ut, s_ud, s_dtb, s_dtt, s_dtd, s_zb, s_zt, s_zd, s_Bb, s_Bt, s_Bn, s_Cb, s_Ct, s_Cn, s_ob, s_ot, s_od,
    SOFTPLUS: tl.constexpr, HAS_DH_LAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b, block_d = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_d = block_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n, local_t = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_T)
    mask_d, mask_n = offs_d < D, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    offs_dn = offs_d[:, None] * N + offs_n[None, :]
    A = tl.load(A_ptr + offs_dn, mask=mask_dn, other=0.0)
    A2 = A * LOG2E
    skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    # dL/dh_{t0-1} carried backwards from the chunk after: a_{t0} dL/dh_{t0}; at the end, dL/dh_{T-1} from outside
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_DH_LAST:
        carry = tl.load(dh_last_ptr + b * D * N + offs_dn, mask=mask_dn, other=0.0)
    dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    u_ptr, dt_ptr, z_ptr, dout_ptr = u_ptr + b * s_ub, dt_ptr + b * s_dtb, z_ptr + b * s_zb, dout_ptr + b * s_ob
    B_ptr, C_ptr = B_ptr + b * s_Bb, C_ptr + b * s_Cb
    du_ptr, ddt_ptr, dz_ptr = du_ptr + b * T * D, ddt_ptr + b * T * D, dz_ptr + b * T * D
    dB_ptr, dC_ptr = dB_ptr + (block_d * Bsz + b) * T * N, dC_ptr + (block_d * Bsz + b) * T * N
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        offs_t = c * BLOCK_T + local_t
        mask_t = offs_t < T
        mask_td, mask_tn = mask_t[:, None] & mask_d[None, :], mask_t[:, None] & mask_n[None, :]
        h = tl.load(states_ptr + (b * (n_chunks + 1) + c) * D * N + offs_dn, mask=mask_dn, other=0.0)  # entering
        dt, x = _step_sizes(dt_ptr, bias, offs_t, offs_d, mask_td, s_dtt, s_dtd, SOFTPLUS)
        # each step's successor within the chunk (1 past its end, where the carry takes over)
        mask_next = ((local_t < BLOCK_T - 1) & (offs_t + 1 < T))[:, None] & mask_d[None, :]
        dt_next, _ = _step_sizes(dt_ptr, bias, offs_t + 1, offs_d, mask_next, s_dtt, s_dtd, SOFTPLUS)
        u = _tile(u_ptr, offs_t, offs_d, mask_td, s_ut, s_ud)
        z = _tile(z_ptr, offs_t, offs_d, mask_td, s_zt, s_zd)
        dout = _tile(dout_ptr, offs_t, offs_d, mask_td, s_ot, s_od)
        Bt = _tile(B_ptr, offs_t, offs_n, mask_tn, s_Bt, s_Bn)
        Ct = _tile(C_ptr, offs_t, offs_n, mask_tn, s_Ct, s_Cn)

        # recompute the chunk's states and output, as the forward did
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])
        bu = (dt * u)[:, :, None] * Bt[:, None, :]
        a_cum, h_zero_start = tl.associative_scan((a, bu), 0, _compose)
        hs = h_zero_start + a_cum * h[None, :, :]
        y = tl.sum(hs * Ct[:, None, :], axis=2) + skip[None, :] * u
        gate = tl.sigmoid(z)
        dz = dout * y * gate * (1.0 + z * (1.0 - gate))
        dy = dout * z * gate

        # dL/dh_t = C_t dy_t + a_{t+1} dL/dh_{t+1}: a reverse scan, then the carry from the chunk after
        a_next = tl.exp2(dt_next[:, :, None] * A2[None, :, :])
        a_prod, g_zero_end = tl.associative_scan((a_next, dy[:, :, None] * Ct[:, None, :]), 0, _compose, reverse=True)
        g = tl.where(mask_t[:, None, None], g_zero_end + a_prod * carry[None, :, :], 0.0)
        carry = tl.sum(tl.where((local_t == 0)[:, None, None], a * g, 0.0), axis=0)

        g_a_h = g * (hs - bu)  # dL/da_t times a_t: g_t h_{t-1} a_t, with no division by a_t
        gB = tl.sum(g * Bt[:, None, :], axis=2)
        ddt = u * gB + tl.sum(g_a_h * A[None, :, :], axis=2)
        if SOFTPLUS:
            ddt = ddt * tl.where(x <= 20.0, tl.sigmoid(x), 1.0)
        ddt = tl.where(mask_td, ddt, 0.0)
        dA += tl.sum(g_a_h * dt[:, :, None], axis=0)
        dD += tl.sum(dy * u, axis=0)
        dbias += tl.sum(ddt, axis=0)
        offs_td = offs_t[:, None] * D + offs_d[None, :]
        tl.store(du_ptr + offs_td, (dt * gB + dy * skip[None, :]).to(du_ptr.dtype.element_ty), mask=mask_td)
        tl.store(ddt_ptr + offs_td, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_td)
        tl.store(dz_ptr + offs_td, dz.to(dz_ptr.dtype.element_ty), mask=mask_td)
        offs_tn = offs_t[:, None] * N + offs_n[None, :]
        tl.store(dB_ptr + offs_tn, tl.sum(g * (dt * u)[:, :, None], axis=1), mask=mask_tn)  # this block's share
        tl.store(dC_ptr + offs_tn, tl.sum(dy[:, :, None] * hs, axis=1), mask=mask_tn)
    tl.store(dA_ptr + b * D * N + offs_dn, dA, mask=mask_dn)
    tl.store(dD_ptr + b * D + offs_d, dD, mask=mask_d)
    tl.store(dbias_ptr + b * D + offs_d, dbias, mask=mask_d)
    tl.store(dh0_ptr + b * D * N + offs_dn, carry, mask=mask_dn)


def _strides(*tensors: Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def default_tiles(batch: int, channels: int, device: torch.device) -> list[int]:
    """[channels per program, forward warps, backward warps]. 16 channels, 8 and 4 warps were the
    fastest of the tiles timed on an H100 at batch 8 (docs/models.md). Each program walks the whole
    sequence, so a small batch gets narrower programs, down to 4 channels, to give every multiprocessor
    several; the warps shrink with them, so each thread keeps the same share of a chunk."""
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    block_d = 16
    while block_d > 4 and batch * triton.cdiv(channels, block_d) < 4 * processors:
        block_d //= 2
    return [block_d, block_d // 2, max(1, block_d // 4)]


@torch.library.custom_op("lmlab::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor,
    delta_bias: Tensor,
    h0: Tensor | None,
    delta_softplus: bool,
    block_t: int,
    tiles: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [B, T, D] in u's dtype, h_T [B, D, N] fp32, and the backward's checkpoints: the state entering
    each chunk and the last one [B, T / block_t + 1, D, N] fp32). `tiles`: see default_tiles; [] picks them."""
    batch, length, channels = u.shape
    n = A.size(1)
    block_d, num_warps, _ = tiles or default_tiles(batch, channels, u.device)
    out = torch.empty(batch, length, channels, device=u.device, dtype=u.dtype)
    states = torch.empty(batch, triton.cdiv(length, block_t) + 1, channels, n, device=u.device, dtype=torch.float32)
    h_last = torch.empty(batch, channels, n, device=u.device, dtype=torch.float32)
    A, D, delta_bias = (t.float().contiguous() for t in (A, D, delta_bias))
    h0 = None if h0 is None else h0.float().contiguous()
    _scan_fwd_kernel[(batch, triton.cdiv(channels, block_d))](
        u, delta, z, B, C, A, D, delta_bias, h0, out, states, h_last, length, channels, n,
        *_strides(u, delta, z, B, C),
        SOFTPLUS=delta_softplus, HAS_H0=h0 is not None,
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n), num_warps=num_warps,
    )  # fmt: skip
    return out, h_last, states


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, block_t, tiles):
    batch, length, channels = u.shape
    n_chunks = (length + block_t - 1) // block_t
    state = dict(device=u.device, dtype=torch.float32)
    return (
        u.new_empty(batch, length, channels),
        torch.empty(batch, channels, A.size(1), **state),
        torch.empty(batch, n_chunks + 1, channels, A.size(1), **state),
    )


@torch.library.custom_op("lmlab::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor,
    delta_bias: Tensor,
    states: Tensor,
    dout: Tensor,
    dh_last: Tensor | None,
    delta_softplus: bool,
    block_t: int,
    tiles: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (u, delta, A, B, C, D, z, delta_bias, h0), each in its input's dtype (h0's fp32),
    from `states`, the forward's checkpoints, and the gradients of y (dout) and h_T (dh_last)."""
    batch, length, channels = u.shape
    n = A.size(1)
    block_d, _, num_warps = tiles or default_tiles(batch, channels, u.device)
    n_blocks = triton.cdiv(channels, block_d)
    du, ddelta, dz = (torch.empty(batch, length, channels, device=u.device, dtype=t.dtype) for t in (u, delta, z))
    per_block = dict(device=u.device, dtype=torch.float32)
    dB, dC = (torch.empty(n_blocks, batch, length, n, **per_block) for _ in range(2))
    dA, dh0 = (torch.empty(batch, channels, n, **per_block) for _ in range(2))
    dD, dbias = (torch.empty(batch, channels, **per_block) for _ in range(2))
    dh_last = None if dh_last is None else dh_last.float().contiguous()
    _scan_bwd_kernel[(batch, n_blocks)](
        u, delta, z, B, C, A.float().contiguous(), D.float().contiguous(), delta_bias.float().contiguous(),
        states, dout, dh_last, du, ddelta, dz, dB, dC, dA, dD, dbias, dh0, batch, length, channels, n,
        *_strides(u, delta, z, B, C, dout),
        SOFTPLUS=delta_softplus, HAS_DH_LAST=dh_last is not None,
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n), num_warps=num_warps,
    )  # fmt: skip
    sums = dA.sum(0).to(A.dtype), dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype), dD.sum(0).to(D.dtype)
    return du, ddelta, *sums, dz, dbias.sum(0).to(delta_bias.dtype), dh0


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, states, dout, dh_last, delta_softplus, block_t, tiles):
    """Shapes, dtypes and strides as the kernel's: every output is a new contiguous tensor."""
    like = (u, delta, A, B, C, D, z, delta_bias)
    return (*(t.new_empty(t.shape) for t in like), u.new_empty(u.size(0), u.size(2), A.size(1), dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, h0, *ctx.settings = inputs
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])


def _backward(ctx, dout, dh_last, _dstates):
    *inputs, states = ctx.saved_tensors
    dout = torch.zeros_like(inputs[0]) if dout is None else dout
    grads = selective_scan_bwd(*inputs, states, dout, dh_last, *ctx.settings)
    return (*grads[:-1], grads[-1] if ctx.has_h0 else None, None, None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_fused(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor,
    delta_bias: Tensor | None = None,
    h0: Tensor | None = None,
    delta_softplus: bool = False,
    block_t: int = BLOCK_T,
    tiles: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """models.scan.selective_scan with dt = softplus(delta + delta_bias) (`delta_softplus`; else
    delta + delta_bias), fused: u, delta, z [B, T, D]; A [D, N]; B, C [B, T, N]; D [D]; h0 [B, D, N].
    Any strides. Returns y [B, T, D] (u's dtype) and h_T [B, D, N] (fp32), both differentiable.
    `block_t` steps per chunk; `tiles` [channels per program, forward warps, backward warps] or None
    (default_tiles)."""
    if delta_bias is None:
        delta_bias = torch.zeros(u.size(-1), device=u.device, dtype=torch.float32)
    y, h_last, _ = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, block_t, tiles or [])
    return y, h_last
