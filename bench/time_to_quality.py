"""Time to quality on CPU: how fast does the default `python train.py` reach a good validation loss?

Runs the real command line in a subprocess, start-up included, and reads every full-split
validation loss with its wall-clock time from the run's TensorBoard events. Also reports the run's
peak resident memory.

    python bench/time_to_quality.py                       # the default run
    python bench/time_to_quality.py -- trainer.max_steps=2000 data.batch_size=64   # any overrides
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-loss", type=float, default=1.70, help="nats per character")
    parser.add_argument("--budget-s", type=float, default=90.0)
    parser.add_argument("--name", default="time_to_quality")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="ttq-"))
    command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *args.overrides]
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - started
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    curve = [{"wall_s": e.wall_time - started, "step": e.step, "val_loss": e.value} for e in events.Scalars("val/loss")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    reached = next((p for p in curve if p["val_loss"] <= args.target_loss), None)
    summary = {
        "command": " ".join(["python train.py", *args.overrides]),
        "wall_s": wall,
        "final_val_loss": metrics["val/loss"],
        "final_val_bpb": metrics["val/bpb"],
        "test_bpb": metrics["test/bpb"],
        "steps": metrics["steps"],
        "peak_rss_mib": peak_rss_mib,
        "target_loss": args.target_loss,
        "budget_s": args.budget_s,
        "reached_target_at_s": reached["wall_s"] if reached else None,
        "met": metrics["val/loss"] <= args.target_loss and wall <= args.budget_s,
    }
    print(table(curve, ["wall_s", "step", "val_loss"]))
    print(table([summary], ["wall_s", "steps", "final_val_loss", "final_val_bpb", "test_bpb", "peak_rss_mib", "met"]))
    print("written to", write_results(args.name, {"summary": summary, "curve": curve}))


if __name__ == "__main__":
    main()
