"""GPU throughput side by side: nanoGPT's own bench.py and lmlab's Trainer.fit, same card, same run.

nanoGPT is not a dependency: give the path of a checkout (`--nanogpt PATH` or NANOGPT=PATH). Its
`bench.py` runs unmodified, from a temporary copy, with `--real_data=False --compile=True` (GPT-2
small, context 1024, bf16, fused AdamW, 10 warm-up then 20 timed steps) at each batch size;
lmlab's `bench/throughput.py --preset gpt2-small` runs the same shape in a child process of this
one, with the shipped callbacks and logger, once per `--variant` (a label and throughput.py
arguments). Runs alternate nanoGPT, lmlab variants, next batch, so both see the same card state.

    python bench/nanogpt_side_by_side.py --nanogpt ../shared/anchors/nanoGPT --batch 12 --batch 32 \\
        --variant compiled= --variant "cudnn+chunked=--attention cudnn --loss-chunk-rows 8192"

MFU for both = tokens/s x (6N + 12*L*H*Q*T) / 989 TFLOP/s (H100/H200 SXM bf16 dense); nanoGPT's
own printed MFU (against an A100's 312 TFLOP/s) is kept beside it as `nanogpt_printed_mfu`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

from lmlab.models import GPT

ROOT = Path(__file__).resolve().parents[1]
PEAK = 989e12
BLOCK = 1024
NANOGPT_LINE = re.compile(r"time per iteration: ([\d.]+)ms, MFU: ([\d.]+)%")


def gpt2_flops_per_token() -> float:
    """The same count for both: nanoGPT's GPT-2 small and lmlab's are one shape (50,304 padded vocabulary)."""
    return GPT(50257, d_model=768, n_layer=12, n_head=12, block_size=BLOCK, pad_vocab_to=64).flops_per_token()


def run_nanogpt(checkout: Path, batch: int, timeout: int) -> dict:
    """nanoGPT's bench.py, unmodified, from a temporary copy of the checkout (it reads configurator.py from cwd)."""
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as tmp:
        for name in ("bench.py", "model.py", "configurator.py"):
            shutil.copy(checkout / name, tmp)
        command = [sys.executable, "bench.py", "--real_data=False", f"--batch_size={batch}", "--compile=True"]
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=timeout)
    found = NANOGPT_LINE.search(done.stdout)
    if done.returncode != 0 or not found:
        raise SystemExit(f"nanoGPT's bench.py failed at batch {batch}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    ms = float(found.group(1))
    return {
        "nanogpt_ms_per_step": ms,
        "nanogpt_tok_s": batch * BLOCK / (ms / 1e3),
        "nanogpt_printed_mfu": found.group(2),
    }


def run_lmlab(batch: int, variant: str, steps: int, warmup: int, timeout: int) -> dict:
    """bench/throughput.py on the GPT-2 small preset at `batch`, lmlab only, with the variant's arguments."""
    with tempfile.TemporaryDirectory(prefix="lmlab-side-") as tmp:
        command = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--preset", "gpt2-small"]
        command += ["--batch", str(batch), "--no-plain", "--steps", str(steps), "--warmup", str(warmup)]
        command += ["--repeats", "1", "--name", "lmlab", *shlex.split(variant)]
        env = {**os.environ, "LMLAB_RESULTS_DIR": tmp}
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if done.returncode != 0:  # one variant failing (an attention kernel this card lacks) leaves the others
            print(done.stderr[-3000:], file=sys.stderr)
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
        (row,) = json.loads((Path(tmp) / "lmlab.json").read_text())["rows"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, default=os.environ.get("NANOGPT"), help="a nanoGPT checkout")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 12 and 32)")
    parser.add_argument(
        "--variant",
        action="append",
        help="LABEL=ARGS: lmlab's throughput.py arguments for one measurement (default: compiled=)",
    )
    parser.add_argument(
        "--winner-only",
        action="store_true",
        help="after the first batch size, run only the variant that was fastest there (saves compile time)",
    )
    parser.add_argument("--steps", type=int, default=20, help="lmlab's timed steps (nanoGPT's bench.py times 20)")
    parser.add_argument("--warmup", type=int, default=10, help="lmlab's untimed steps (nanoGPT's: 10)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed for each child run")
    parser.add_argument("--name", default="nanogpt_side_by_side", help="results file: bench/results/NAME.json")
    args = parser.parse_args()
    if args.nanogpt is None or not (Path(args.nanogpt) / "bench.py").is_file():
        raise SystemExit("give a nanoGPT checkout with bench.py: --nanogpt PATH (or NANOGPT=PATH)")
    variants = dict(v.split("=", 1) for v in (args.variant or ["compiled="]))
    flops = gpt2_flops_per_token()

    rows = []
    for batch in args.batch or [12, 32]:
        reference = run_nanogpt(Path(args.nanogpt), batch, args.timeout)
        print(f"nanoGPT batch {batch}: {reference['nanogpt_tok_s']:,.0f} tokens/s", flush=True)
        for label, variant in variants.items():
            lmlab = run_lmlab(batch, variant, args.steps, args.warmup, args.timeout)
            row = {"batch": batch, "lmlab_variant": label, "lmlab_args": variant, **reference}
            row["nanogpt_mfu"] = reference["nanogpt_tok_s"] * flops / PEAK
            if "error" in lmlab:
                print(f"  lmlab {label}: failed ({lmlab['error']})", flush=True)
                rows.append({**row, **lmlab})
                continue
            row |= {
                "lmlab_tok_s": lmlab["lmlab_tok_s"],
                "lmlab_ms_per_step": lmlab["ms_per_step"],
                "lmlab_mfu": lmlab["lmlab_tok_s"] * flops / PEAK,
                "lmlab_over_nanogpt": lmlab["lmlab_tok_s"] / reference["nanogpt_tok_s"],
                "lmlab_peak_gib": lmlab.get("peak_gib"),
                "device": lmlab["device"],
            }
            print(f"  lmlab {label}: {row['lmlab_tok_s']:,.0f} tokens/s, {row['lmlab_over_nanogpt']:.3f}x", flush=True)
            rows.append(row)
        measured = [r for r in rows if r["batch"] == batch and "lmlab_tok_s" in r]
        if args.winner_only and measured:
            winner = max(measured, key=lambda r: r["lmlab_tok_s"])["lmlab_variant"]
            variants = {winner: variants[winner]}
    columns = ["batch", "lmlab_variant", "nanogpt_tok_s", "lmlab_tok_s", "lmlab_over_nanogpt", "nanogpt_mfu"]
    columns += ["lmlab_mfu", "lmlab_peak_gib", "error"]
    print(table(rows, columns))
    settings = {"batch": args.batch or [12, 32], "variants": [v for v in args.variant or ["compiled="]]}
    settings |= {"winner_only": args.winner_only, "steps": args.steps, "warmup": args.warmup}
    settings["nanogpt"] = str(args.nanogpt)
    print("written to", write_results(args.name, {"settings": settings, "rows": rows}))


if __name__ == "__main__":
    main()
