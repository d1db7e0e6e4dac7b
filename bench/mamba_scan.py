"""Mamba's selective scan, forward + backward: the log-depth parallel scan against the sequential
reference, the fused Triton kernel (models/kernels/triton_scan.py) on a GPU, and mamba-ssm's fused
CUDA kernel where it imports, at sequence lengths 256-4096.

    python bench/mamba_scan.py --device cuda                          # one Mamba layer of a ~100M model
    python bench/mamba_scan.py --device cuda --batch 8 --seq-lens 1024 --dtype bf16 --methods triton \
        --tiles 16x16x8x4 16x8x4x2                                  # Triton tiles: steps x channels x warps fwd x bwd
    python bench/mamba_scan.py --device cpu --d-inner 64 --seq-lens 256 512 --repeats 2   # a quick CPU check
    python bench/mamba_scan.py --device cpu --d-inner 256 --batch 2 --sequential-up-to 2048 --repeats 1

Writes bench/results/mamba_scan_<device>.json (machine, versions, git commit, one row per length
and method). Inputs are random with Mamba's shapes (u, dt, z [B, T, d_inner]; B, C [B, T, d_state];
`--dtype bf16`: these in bf16, as autocast makes them); the time is the median of `repeats` runs
after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

from lmlab.models.kernels import triton_runs_on, triton_selective_scan
from lmlab.models.mamba import cuda_selective_scan
from lmlab.models.scan import selective_scan


def inputs(
    batch: int, length: int, d_inner: int, d_state: int, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    u, z, dt = randn(batch, length, d_inner), randn(batch, length, d_inner), F.softplus(randn(batch, length, d_inner))
    A = -torch.arange(1, d_state + 1, device=device, dtype=torch.float32).repeat(d_inner, 1)
    B, C, D = randn(batch, length, d_state), randn(batch, length, d_state), randn(d_inner)
    u, dt, B, C, z = (t.to(dtype) for t in (u, dt, B, C, z))
    return [t.requires_grad_() for t in (u, dt, A, B, C, D, z)]


def run_scan(method: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    u, dt, A, B, C, D, z = tensors
    if method == "cuda kernel":
        kernel = cuda_selective_scan()
        bt = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  (the kernel wants [B, channels, T])
        return kernel(bt(u), bt(dt), A, bt(B), bt(C), D, bt(z)).transpose(1, 2)
    if method.startswith("triton"):  # "triton" (the default tiles) or "triton TxDxFxB"
        tiles = {}
        if " " in method:
            block_t, *rest = map(int, method.split()[1].split("x"))
            tiles = {"block_t": block_t, "tiles": rest}
        return triton_selective_scan()(u, dt, A, B, C, D, z, **tiles)[0]
    return selective_scan(u, dt, A, B, C, D, z, method=method)[0]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(method: str, tensors: list[torch.Tensor], repeats: int, device: torch.device) -> dict:
    def forward() -> torch.Tensor:
        return run_scan(method, tensors)

    def forward_backward() -> None:
        run_scan(method, tensors).square().mean().backward()

    forward_backward()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fwd = statistics.median(timed(forward, device) for _ in range(repeats))
    both = statistics.median(timed(forward_backward, device) for _ in range(repeats))
    row = {"forward ms": 1e3 * fwd, "fwd+bwd ms": 1e3 * both}
    if device.type == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d-inner", type=int, default=1536, help="expand x d_model (2 x 768 at ~100M parameters)")
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="of u, dt, z, B, C")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="default: parallel, sequential and the fused kernels that run here"
    )
    parser.add_argument(
        "--tiles",
        nargs="+",
        default=[],
        help="also time the Triton kernel with these tiles: steps x channels x forward warps x backward warps",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--name", default=None, help="results file: bench/results/NAME.json (default mamba_scan_<device>)"
    )
    parser.add_argument(
        "--sequential-up-to",
        type=int,
        default=None,
        help="skip the sequential reference beyond this length (slow on CPU)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = args.methods or ["parallel", "sequential"]
    if args.methods is None and triton_selective_scan() is not None and triton_runs_on(device):
        methods.append("triton")
    if args.methods is None and device.type == "cuda" and cuda_selective_scan() is not None:
        methods.append("cuda kernel")
    methods += [f"triton {tile}" for tile in args.tiles]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows = []
    for length in args.seq_lens:
        tensors = inputs(args.batch, length, args.d_inner, args.d_state, device, dtype)
        skip = {"sequential"} if args.sequential_up_to is not None and length > args.sequential_up_to else set()
        measured = {}
        for method in (m for m in methods if m not in skip):
            row = {"seq_len": length, "method": method, **measure(method, tensors, args.repeats, device)}
            rows.append(row)
            measured[method] = row
            print(row, flush=True)
        if "sequential" in measured:
            measured["parallel"]["speed-up vs sequential"] = (
                measured["sequential"]["fwd+bwd ms"] / measured["parallel"]["fwd+bwd ms"]
            )
        for method, row in measured.items():
            if "parallel" in measured and method not in ("parallel", "sequential"):
                row["speed-up vs parallel"] = measured["parallel"]["fwd+bwd ms"] / row["fwd+bwd ms"]

    print(
        f"batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}, {args.dtype}, {device.type}, "
        f"median of {args.repeats}"
    )
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    settings = {k: getattr(args, k) for k in ("batch", "d_inner", "d_state", "dtype", "repeats", "threads")}
    path = write_results(args.name or f"mamba_scan_{device.type}", {"settings": settings, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
