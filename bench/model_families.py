"""Training throughput, MFU, peak memory and generation latency of gpt, llama, mamba, mamba2 and jamba at
about the same parameter count (issue 11's benchmark; mamba2 and MFU from issue 27).

    python bench/model_families.py                                   # GPU: ~100M parameters, bf16, 8 x 1024 tokens
    python bench/model_families.py --compile                         # the same, torch.compile'd
    python bench/model_families.py --capacity-factor 1.25            # jamba's experts with a capacity (static shapes)
    python bench/model_families.py --cuda-graphs                     # each step replayed as a CUDA graph (lmlab's default on one GPU)
    python bench/model_families.py --profile 15                      # also the 15 ops with the most GPU time per step
    python bench/model_families.py --liger                           # Liger-Kernel's RMSNorm, SwiGLU and fused loss
    python bench/model_families.py --smoke                           # a seconds-long check on the CPU that it runs

Each family keeps its depth (gpt and llama 12 layers, mamba and mamba2 24, jamba 8 with one attention
layer at offset 4 and 8 experts, top-2, on every other layer) and gets the width (a multiple of 128:
heads of 64, two query heads per key/value head; mamba2's SSM heads of 64 channels) whose parameter
count is closest to --target-params; MoE runs also report the parameters a token passes through.
Training: AdamW steps on random tokens under bf16 autocast, tokens/s over --steps steps after 3
warm-up steps, peak GPU memory, and MFU: tokens/s x training FLOPs per token (flops_per_token at
--seq-len) over the card's dense bf16 peak (989 TFLOP/s on an H100 or H200; --peak-tflops for other
cards; no MFU column when the peak is unknown). Generation: the model cast to bf16, batch 1, the
state filled with C tokens, then the median time of one more token, for each context C in --contexts
(the Mambas' states do not grow, so their times should stay flat). Writes
bench/results/model_families_<device>.json (--smoke writes model_families_smoke.json).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

from lmlab.graphed_step import GraphedTrainingStep
from lmlab.models import GPT, Jamba, LanguageModel, Llama, Mamba, Mamba2, MoEConfig, count_parameters
from lmlab.models.ffn import SwiGLU
from lmlab.perf.peak import peak_flops

SMOKE = dict(
    device="cpu", target_params=1e6, vocab=256, batch=2, seq_len=128, contexts=[128, 256], steps=2, gen_tokens=4
)

FAMILIES = {
    "gpt": lambda d, v, ctx: GPT(v, d_model=d, n_layer=12, n_head=d // 64, block_size=ctx),
    "llama": lambda d, v, ctx: Llama(v, d_model=d, n_layer=12, n_head=d // 64, n_kv_head=d // 128, block_size=ctx),
    "mamba": lambda d, v, ctx, kernels="auto": Mamba(v, d_model=d, n_layer=24, kernels=kernels),
    "mamba2": lambda d, v, ctx, kernels="auto": Mamba2(v, d_model=d, n_layer=24, n_head=2 * d // 64, kernels=kernels),
    "jamba": lambda d, v, ctx, capacity_factor=None, kernels="auto": Jamba(
        v,
        d_model=d,
        n_layer=8,
        n_head=d // 64,
        n_kv_head=d // 128,
        attn_every=8,  # the paper's pattern (the class defaults are the small CPU stack's)
        attn_offset=4,
        moe=MoEConfig(n_experts=8, top_k=2, moe_every=2, capacity_factor=capacity_factor),
        block_size=ctx,
        kernels=kernels,
    ),
}
SSM_FAMILIES = ("mamba", "mamba2", "jamba")


def sized(family: str, target: float, vocab: int, context: int) -> tuple[int, int]:
    """(d_model, parameters): the multiple of 128 closest to `target` parameters, counted on the meta device."""
    with torch.device("meta"):
        counts = {d: count_parameters(FAMILIES[family](d, vocab, context)) for d in range(128, 4097, 128)}
    return min(counts.items(), key=lambda item: abs(item[1] - target))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def with_liger(model: LanguageModel) -> Callable[[Tensor, Tensor], Tensor]:
    """Swap in Liger-Kernel's Triton kernels where the model has their layer (RMSNorm, SwiGLU's
    silu(gate) * up) and return a loss that never materialises the logits (Liger's fused linear
    cross-entropy on the output layer's weight): measured here before any of it becomes a switch."""
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerRMSNorm

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.RMSNorm):
                fused = LigerRMSNorm(child.normalized_shape[0], eps=child.eps or 1e-6).to(child.weight.device)
                setattr(parent, name, fused)
            elif isinstance(child, SwiGLU):
                child.forward = lambda x, m=child: m.dropout(m.proj(LigerSiLUMulFunction.apply(m.gate(x), m.up(x))))
    head, flce = model.lm_head.weight, LigerFusedLinearCrossEntropyLoss()
    model.lm_head = nn.Identity()  # the model now returns its final hidden states
    return lambda hidden, y: flce(head, hidden.flatten(0, 1), y.flatten())


def plain_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def device_profile(step: Callable[[], None], device: torch.device, top: int) -> dict:
    """The ops with the most GPU time over two steps (per step), and how busy the GPU was."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync(device)
    ops = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    ops = sorted(ops, key=lambda e: e.self_device_time_total, reverse=True)
    busy = sum(e.self_device_time_total for e in ops) / 2e3
    return {
        "gpu busy ms/step": busy,
        "top ops (self GPU ms/step, calls/step)": [
            [e.key, round(e.self_device_time_total / 2e3, 3), e.count // 2] for e in ops[:top]
        ],
    }


def train_speed(model: LanguageModel, args: argparse.Namespace, device: torch.device) -> dict:
    """Tokens/s of full training steps (forward, loss + aux loss, backward, AdamW) and peak memory."""
    loss_of = with_liger(model) if args.liger else plain_loss
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    forward = torch.compile(model) if args.compile else model
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def losses(x: Tensor, y: Tensor, state: object) -> tuple[Tensor, Tensor, Tensor | None, object]:
        with autocast(device, args.dtype):
            logits, _ = forward(x)
            loss, aux = loss_of(logits, y), model.aux_loss()
        return (loss if aux is None else loss + aux), loss, aux, state

    graphed = GraphedTrainingStep(losses, list(model.parameters())) if args.cuda_graphs else None

    def step() -> None:
        if graphed is not None:  # the product's step on one GPU (perf.cuda_graphs=auto): gradients from a graph
            graphed(x, y)
        else:
            optimizer.zero_grad(set_to_none=True)
            losses(x, y, None)[0].backward()
        optimizer.step()

    for _ in range(3):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    row = {"train tok/s": args.batch * args.seq_len * args.steps / seconds}
    if device.type == "cuda":
        row["peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        row |= device_profile(step, device, args.profile)
    return row


@torch.no_grad()
def generation_ms(model: LanguageModel, context: int, args: argparse.Namespace, device: torch.device) -> float:
    """Median ms for one more token once `context` tokens are in the state (KV cache or SSM state)."""
    prompt = torch.randint(0, args.vocab, (1, context), device=device)
    logits, state = model(prompt, model.init_state(1, device))
    times = []
    for _ in range(args.gen_tokens):
        token = logits[:, -1:].argmax(-1)
        sync(device)
        start = time.perf_counter()
        logits, state = model(token, state)
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--target-params", type=float, default=100e6)
    parser.add_argument("--vocab", type=int, default=50304, help="GPT-2's BPE vocabulary, padded to a multiple of 64")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--gen-tokens", type=int, default=32, help="tokens timed after each context")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--capacity-factor", type=float, default=None, help="jamba's MoE capacity; none: dropless")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the card's peak for MFU (default: known cards)"
    )
    parser.add_argument("--kernels", default="auto", help="model.kernels of mamba, mamba2 and jamba (torch: none)")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="replay each step's forward and backward as a CUDA graph"
    )
    parser.add_argument("--liger", action="store_true", help="Liger-Kernel's RMSNorm, SwiGLU and fused loss")
    parser.add_argument("--profile", type=int, default=0, metavar="K", help="record the K ops with most GPU time")
    parser.add_argument("--name", default=None, help="results file: bench/results/NAME.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: " + str(SMOKE))
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    context = max(args.seq_len, *args.contexts) + args.gen_tokens  # attention models' KV cache and positions
    peak = peak_flops(device, args.peak_tflops)
    rows = []
    for family in args.families:
        d_model, params = sized(family, args.target_params, args.vocab, context)
        torch.manual_seed(0)
        extra = {"capacity_factor": args.capacity_factor} if family == "jamba" else {}
        extra |= {"kernels": args.kernels} if family in SSM_FAMILIES else {}
        if args.cuda_graphs and family == "jamba" and args.capacity_factor is None:
            extra["capacity_factor"] = 1.25  # dropless routing has data-dependent shapes: no graph
        model = FAMILIES[family](d_model, args.vocab, context, **extra).to(device)
        row = {"family": family, "d_model": d_model, "params": params, "active params": model.matmul_parameters()}
        row["train GFLOP/token"] = model.flops_per_token(args.seq_len) / 1e9
        try:
            row.update(train_speed(model.train(), args, device))
            if peak is not None:
                row["MFU %"] = 100 * row["train tok/s"] * model.flops_per_token(args.seq_len) / peak
            model = model.eval().to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
            for c in [] if args.liger else args.contexts:  # --liger replaced the output layer generation needs
                row[f"gen ms/token @{c}"] = generation_ms(model, c, args, device)
        except torch.cuda.OutOfMemoryError as err:
            row["error"] = f"out of memory: {str(err).splitlines()[0]}"
        rows.append(row)
        print(row, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(
        f"{device.type}, {args.dtype}{', compiled' if args.compile else ''}, batch {args.batch} x {args.seq_len} "
        f"tokens, vocab {args.vocab}, {args.steps} steps"
    )
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    settings = {k: getattr(args, k) for k in ("target_params", "vocab", "batch", "seq_len", "steps", "contexts")}
    settings |= {"dtype": args.dtype, "compile": args.compile, "gen_tokens": args.gen_tokens, "threads": args.threads}
    settings |= {
        "capacity_factor": args.capacity_factor,
        "liger": args.liger,
        "cuda_graphs": args.cuda_graphs,
        "kernels": args.kernels,
        "peak_tflops": None if peak is None else peak / 1e12,
    }
    suffix = "_compiled" if args.compile else ""
    name = args.name or ("model_families_smoke" if args.smoke else f"model_families_{device.type}{suffix}")
    path = write_results(name, {"settings": settings, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
