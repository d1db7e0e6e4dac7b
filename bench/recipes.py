"""Run a published-number recipe (conf/experiment/<name>.yaml) and record what it reached.

    python bench/recipes.py ptb_lstm_medium                         # the full recipe (GPU)
    python bench/recipes.py ptb_lstm_medium --time-limit 560        # stop with a resumable checkpoint after 560 s
    python bench/recipes.py ptb_lstm_medium --time-limit 560        # ... the same command again continues it
    python bench/recipes.py shakespeare_char --tiny                 # a seconds-long CPU check of the wiring
    python bench/recipes.py shakespeare_char trainer.max_steps=2500 # any train.py override passes through

The run goes to outputs/recipes/<name> (--run-dir to choose). A run stopped by --time-limit (SIGTERM:
lmlab writes last.ckpt at the next step and exits) is resumed by the same command, and its wall time is
the sum of its parts. When it has finished, bench/results/recipe_<name>.json holds the machine, library
versions, git commit, wall time, the val/test scores next to the published number, and the validation
curve, drawn in recipe_<name>.png. Results go to $LMLAB_RESULTS_DIR instead when it is set.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import RESULTS, ROOT, write_results
from matplotlib.figure import Figure

from lmlab.report.runs import read_curve


@dataclass(frozen=True)
class Published:
    """The number a recipe is checked against, and where it comes from."""

    metric: str  # the key in the run's metrics.json
    value: float
    target: float  # the run passes when metric <= target
    source: str


RECIPES = {
    "ptb_lstm_medium": Published(
        "test/ppl", 82.7, 82.7, "Zaremba et al. 2014, medium regularized LSTM (TensorFlow tutorial: 82.07)"
    ),
    "ptb_lstm_medium_tied": Published(
        "test/ppl", 75.96, 76.0, "PyTorch examples word_language_model, 650 units, tied, 40 epochs"
    ),
    "shakespeare_char": Published(
        "val/loss", 1.4686, 1.465, "nanoGPT train_shakespeare_char best val loss, measured on one H200 (issue 10)"
    ),
}

# Seconds on a CPU: the recipe's groups, schedule and data path, at a toy size.
TINY = {
    "ptb": [
        "model.d_model=32",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=30",
        "trainer.limit_val_batches=20",
        "trainer.limit_test_batches=20",
        "sample.max_new_tokens=5",
    ],
    "shakespeare_char": [
        "model.d_model=64",
        "model.n_layer=2",
        "model.n_head=2",
        "data.block_size=64",
        "data.batch_size=16",
        "perf.compile=false",
        "task.scheduler.warmup_steps=5",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.max_steps=30",
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=5",
        "sample.max_new_tokens=5",
    ],
}
TIME_LIMIT_EXIT = 3  # stopped by --time-limit with a resumable checkpoint: run the same command again
SCORES = ("val/loss", "val/ppl", "val/bpb", "test/loss", "test/ppl", "test/bpb")


def run_part(command: list[str], time_limit: float | None) -> tuple[int, float, bool]:
    """Run train.py once: (exit code, seconds, whether the time limit stopped it)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT)
    try:
        code = process.wait(timeout=time_limit)
        return code, time.perf_counter() - started, False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # lmlab finishes the step, writes last.ckpt and exits
        code = process.wait()
        return code, time.perf_counter() - started, True


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def curve_png(name: str, run_dir: Path, published: Published, path: Path) -> None:
    """Validation loss (and perplexity, for word-level runs) against optimizer steps, with the published mark."""
    points = read_curve(run_dir)
    key = "val/ppl" if published.metric.endswith("ppl") else "val/loss"
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([p["step"] for p in points], [p[key] for p in points], marker="o", markersize=3, label=f"lmlab {key}")
    ax.axhline(published.value, color="C3", linestyle="--", label=f"published {published.metric} {published.value}")
    ax.set(xlabel="optimizer step", ylabel=key, title=f"{name}: validation curve")
    if key == "val/ppl":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. trainer.devices=1")
    parser.add_argument("--tiny", action="store_true", help="a toy-sized CPU run that checks the wiring in seconds")
    parser.add_argument("--run-dir", type=Path, help="default: outputs/recipes/<recipe>[-tiny]")
    parser.add_argument("--time-limit", type=float, help="seconds before stopping with a resumable checkpoint")
    args = parser.parse_intermixed_args()

    name, published = args.recipe, RECIPES[args.recipe]
    label = f"recipe_{name}" + ("_tiny" if args.tiny else "")
    run_dir = (args.run_dir or ROOT / "outputs" / "recipes" / (name + ("-tiny" if args.tiny else ""))).resolve()
    parts_path = run_dir / "recipe_parts.json"
    parts = read_json(parts_path, [])

    if read_json(run_dir / "metrics.json", {}).get("status") != "completed":
        tiny = TINY["ptb" if name.startswith("ptb") else name] if args.tiny else []
        command = [sys.executable, "train.py", f"experiment={name}", f"hydra.run.dir={run_dir}", *tiny]
        command += args.overrides
        print(" ".join(command), flush=True)
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        code, seconds, stopped = run_part(command, args.time_limit)
        parts.append({"started": started, "seconds": round(seconds, 1), "exit": code})
        run_dir.mkdir(parents=True, exist_ok=True)
        parts_path.write_text(json.dumps(parts, indent=2) + "\n")
        status = read_json(run_dir / "metrics.json", {}).get("status")
        if status != "completed":
            if stopped or status == "interrupted":
                print(f"stopped after {seconds:.0f} s with a resumable checkpoint: run the same command again")
                return TIME_LIMIT_EXIT
            print(f"error: the run failed (exit {code}, status {status}); see {run_dir}", file=sys.stderr)
            return code or 1
    else:
        print(f"{run_dir} holds a finished run: recording it (choose another --run-dir to train again)")

    metrics = read_json(run_dir / "metrics.json", {})
    measured = {key: metrics[key] for key in (*SCORES, "best_step", "steps", "tokens_seen", "params") if key in metrics}
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{label}.png"
    curve_png(name, run_dir, published, png)
    result = measured[published.metric]
    payload = {
        "recipe": name,
        "tiny": args.tiny,
        "command": " ".join(["python bench/recipes.py", name, *args.overrides, *(["--tiny"] if args.tiny else [])]),
        "run_dir": str(run_dir),
        "wall_time_s": round(sum(part["seconds"] for part in parts), 1),
        "parts": parts,
        "published": {published.metric: published.value, "target": published.target, "source": published.source},
        "measured": measured,
        "meets_target": None if args.tiny else result <= published.target,
        "run_info": read_json(run_dir / "run_info.json", {}),  # seed, library versions, commit, corpus hash
        "curve": read_curve(run_dir),
        "curve_png": png.name,
    }
    path = write_results(label, payload)
    verdict = "" if args.tiny else (" (meets the target)" if payload["meets_target"] else " (misses the target)")
    print(f"{name}: {published.metric} {result:.4g} vs published {published.value}{verdict}; {path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
