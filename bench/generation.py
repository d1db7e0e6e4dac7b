"""Per-token generation time as the text grows: with the KV cache (one new position per token)
against re-running the whole prefix for every token (what generation costs without a cache).

    python bench/generation.py                       # a small GPT on CPU, 1024-token context
    python bench/generation.py --context 256 --d-model 64
    python bench/generation.py --gpt2 --batch 1 --batch 16   # GPT-2 small on a GPU: tokens/s

Both decode the same greedy text from the same untrained model (its weights do not change the
cost); each token's time is measured separately and averaged over buckets of positions. The
cached time stays flat as the text grows; the uncached one grows with the prefix length.

`--gpt2`: tokens per second of greedy generation with the 124M GPT-2 shape (bf16 weights on a GPU),
lmlab's `stream_tokens` (KV cache; each one-token step replayed as a CUDA graph, its default on a
GPU, and with `cuda_graph=False`) against two plain loops over the same model: nanoGPT's
`generate` (no cache, the whole prefix re-run for each token) and a bare cached loop (the model
called on one token with its cache, no decoder object), optionally with the model compiled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

from lmlab.generate import IncrementalDecoder
from lmlab.generate.decode import stream_tokens
from lmlab.models import GPT, count_parameters


def token_times(model: GPT, length: int, cached: bool) -> list[float]:
    """Seconds spent on each new token, from a one-token prompt to `length` tokens."""
    decoder = IncrementalDecoder(model, torch.zeros(1, 1, dtype=torch.long), cached=cached)
    times = []
    for _ in range(length - 1):
        token = decoder.logits.argmax(-1)
        start = time.perf_counter()
        decoder.append(token)
        times.append(time.perf_counter() - start)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def plain_uncached(model: GPT, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """nanoGPT's generate, greedy: the whole (cropped) prefix through the model for every new token."""
    idx = prompt
    for _ in range(new):
        logits, _ = model(idx[:, -model.context_length :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@torch.no_grad()
def plain_cached(model: GPT, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """The least a cached loop can do: prompt once into a fresh cache, then one token per call."""
    logits, cache = model(prompt, model.init_state(prompt.size(0), prompt.device))
    out = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new - 1):
        logits, cache = model(out[-1], cache)
        out.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([prompt, *out], dim=1)


@torch.no_grad()
def lmlab_stream(model: GPT, prompt: torch.Tensor, new: int, cuda_graph: bool | None = None) -> torch.Tensor:
    """lmlab's sampling loop, greedy; by default (on a GPU) each one-token step is a replayed CUDA graph."""
    tokens = stream_tokens(model, prompt, new, temperature=0.0, cuda_graph=cuda_graph)
    return torch.cat([prompt, *(t[:, None] for t in tokens)], dim=1)


def gpt2_rows(args: argparse.Namespace) -> list[dict]:
    """Tokens/s of each generation loop at each batch size, best of `args.repeats`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = GPT(50257, d_model=768, n_layer=12, n_head=12, block_size=1024, pad_vocab_to=64)
    model = model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    loops = {"lmlab stream_tokens (cached, CUDA graph: the default)": lmlab_stream}
    loops["lmlab stream_tokens (cached, cuda_graph=False)"] = lambda m, p, n: lmlab_stream(m, p, n, cuda_graph=False)
    loops["plain cached loop"] = plain_cached
    loops["plain uncached loop (nanoGPT generate)"] = plain_uncached
    if args.compile:  # the model compiled with dynamic shapes: the cache grows one position per call
        compiled = torch.compile(model, dynamic=True)
        loops["plain cached loop, compiled model"] = lambda m, p, n: plain_cached(compiled, p, n)
    rows = []
    for batch in args.batch:
        prompt = torch.randint(0, 50257, (batch, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
        for loop in loops.values():  # warm-up at full length: every cache length's kernels chosen, graphs built
            loop(model, prompt, args.new_tokens)
        best = dict.fromkeys(loops, float("inf"))
        outputs = {}
        for _ in range(args.repeats):  # round robin: no loop is always the first one timed after a pause
            for name, loop in loops.items():
                sync(device)
                start = time.perf_counter()
                outputs[name] = loop(model, prompt, args.new_tokens)
                sync(device)
                best[name] = min(best[name], time.perf_counter() - start)
        reference = next(iter(outputs.values()))
        for name, seconds in best.items():
            rows.append(
                {
                    "batch": batch,
                    "loop": name,
                    "tokens_per_s": batch * args.new_tokens / seconds,
                    "ms_per_token_step": 1e3 * seconds / args.new_tokens,
                    "same_tokens": bool(torch.equal(outputs[name], reference)),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024, help="tokens generated (the model's context)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=65, help="Tiny Shakespeare's characters")
    parser.add_argument("--buckets", type=int, default=8, help="position ranges the table averages over")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--name", default=None, help="results file: bench/results/NAME.json")
    parser.add_argument("--gpt2", action="store_true", help="tokens/s of the 124M model (on a GPU)")
    parser.add_argument("--batch", type=int, action="append", help="--gpt2: batch sizes (default 1 and 16)")
    parser.add_argument("--prompt", type=int, default=16, help="--gpt2: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256, help="--gpt2: tokens generated per row")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="--gpt2: also a plain cached loop, model compiled")
    args = parser.parse_args()
    if args.gpt2:
        args.batch = args.batch or [1, 16]
        rows = gpt2_rows(args)
        print(table(rows, list(rows[0])))
        settings = {k: getattr(args, k) for k in ("batch", "prompt", "new_tokens", "repeats", "compile")}
        print("written to", write_results(args.name or "generation_gpt2", {"settings": settings, "rows": rows}))
        return
    args.name = args.name or "generation"

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(
        args.vocab, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head, block_size=args.context
    ).eval()
    token_times(model, 32, cached=True)  # warm-up: first calls allocate and pick kernels
    times = {mode: token_times(model, args.context, cached=mode == "cached") for mode in ("cached", "uncached")}

    width = (args.context - 1) // args.buckets
    rows = []
    for b in range(args.buckets):
        low, high = b * width, (b + 1) * width if b < args.buckets - 1 else args.context - 1
        ms = {mode: 1e3 * sum(t[low:high]) / (high - low) for mode, t in times.items()}
        rows.append(
            {
                "positions": f"{low + 2}-{high + 1}",
                "cached ms/token": ms["cached"],
                "uncached ms/token": ms["uncached"],
                "uncached / cached": ms["uncached"] / ms["cached"],
            }
        )
    totals = {f"{mode}_total_s": round(sum(t), 3) for mode, t in times.items()}
    print(
        f"GPT d_model={args.d_model} n_layer={args.n_layer} n_head={args.n_head} vocab={args.vocab}: "
        f"{count_parameters(model):,} parameters, {args.threads} thread(s)"
    )
    print(table(rows, list(rows[0])))
    print(
        f"whole text of {args.context} tokens: cached {totals['cached_total_s']} s, "
        f"uncached {totals['uncached_total_s']} s"
    )
    gpt2_only = ("name", "gpt2", "batch", "prompt", "new_tokens", "repeats", "compile")
    settings = {key: value for key, value in vars(args).items() if key not in gpt2_only}
    print("written to", write_results(args.name, {"settings": settings, "rows": rows, **totals}))


if __name__ == "__main__":
    main()
