"""Per-token generation time as the text grows: with the KV cache (one new position per token)
against re-running the whole prefix for every token (what generation costs without a cache).

    python bench/generation.py                       # a small GPT on CPU, 1024-token context
    python bench/generation.py --context 256 --d-model 64

Both decode the same greedy text from the same untrained model (its weights do not change the
cost); each token's time is measured separately and averaged over buckets of positions. The
cached time stays flat as the text grows; the uncached one grows with the prefix length.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024, help="tokens generated (the model's context)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=65, help="Tiny Shakespeare's characters")
    parser.add_argument("--buckets", type=int, default=8, help="position ranges the table averages over")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--name", default="generation", help="results file: bench/results/NAME.json")
    args = parser.parse_args()

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
    settings = {key: value for key, value in vars(args).items() if key != "name"}
    print("written to", write_results(args.name, {"settings": settings, "rows": rows, **totals}))


if __name__ == "__main__":
    main()
