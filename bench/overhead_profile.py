"""Where a training step's host time goes: Lightning's hooks, lmlab's callbacks, logging, syncs, data.

Trains one preset through `Trainer.fit` with the shipped configuration (bench/throughput.py's
`shipped_setup`: the callbacks, logger and trainer settings of conf/) under Lightning's
SimpleProfiler, which times every hook of every callback, of the module and of the loop, and
under cProfile, which counts the calls that make the host wait for the device (`.item()`,
`.tolist()`, `float(tensor)`) and the time spent in `self.log`. Beside it, the plain loop of
bench/throughput.py gives the step time without any framework.

    python bench/overhead_profile.py                       # the default CPU model, 60 steps
    python bench/overhead_profile.py --preset lstm-medium  # on a GPU: the PTB shape

Per-step figures are means over the steps after `--warmup`. On a GPU the hooks' host time hides
behind the device's work unless something syncs, which is why the sync count matters there.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.profilers import SimpleProfiler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results
from throughput import (
    PRESETS,
    SCHEDULE,
    SETUPS,
    BenchData,
    batches,
    bench_trainer,
    optimizer_factory,
    perf_of,
    plain_loop,
)

from lmlab.run.quiet import quiet_lightning
from lmlab.task import LanguageModelTask

SYNC_CALLS = ("item", "tolist", "__float__", "__bool__", "synchronize", "cpu")  # methods that wait for the device
LOGGING_CALLS = ("log", "log_dict", "log_metrics")


def profiled_fit(
    name: str, steps: int, warmup: int, setup: str, profile_calls: bool
) -> tuple[dict[str, list[float]], StepClock]:
    """Lightning's per-action durations and the step clock (with cProfile's statistics if `profile_calls`)."""
    p = PRESETS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    data = batches(p, warmup + steps, device)
    task = LanguageModelTask(
        p.build(p.vocab, p.block),
        optimizer=optimizer_factory(p, device),
        scheduler=SCHEDULE,
        weight_decay=0.1,
        stateful=p.stateful,
        perf=perf_of(p),
    )
    out_dir = Path(tempfile.mkdtemp(prefix="lmlab-profile-"))
    profiler = SimpleProfiler(dirpath=out_dir, filename="lightning-profile")  # its own report, kept out of the way
    setup_kwargs = SETUPS[setup](out_dir)
    clock = StepClock(warmup, device, profile_calls)
    trainer = bench_trainer(p, device, len(data), setup_kwargs, clock, profiler=profiler)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:  # on a GPU: PyTorch's own sync warnings, see StepClock
        warnings.simplefilter("always")
        trainer.fit(task, datamodule=BenchData(loader, p.block))
    clock.cuda_syncs = {}
    for warning in caught:
        if "synchroniz" in str(warning.message):
            where = f"{Path(warning.filename).parent.name}/{Path(warning.filename).name}:{warning.lineno}"
            clock.cuda_syncs[where] = clock.cuda_syncs.get(where, 0) + 1 / steps
    return profiler.recorded_durations, clock


def plain_step_seconds(name: str, steps: int, warmup: int) -> float:
    p = PRESETS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    return plain_loop(p, p.build(p.vocab, p.block), batches(p, warmup + steps, device), warmup, device) / steps


class StepClock(pl.Callback):
    """cProfile and a wall clock over the timed steps only (from batch `warmup` to the end of training)."""

    def __init__(self, warmup: int, device: torch.device, profile_calls: bool) -> None:
        self.warmup, self.device = warmup, device
        self.profile = cProfile.Profile() if profile_calls else None
        self.seconds, self.stats = 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()
            if self.profile:
                self.profile.enable()
                if self.device.type == "cuda":  # every synchronizing CUDA call warns, with its Python caller
                    torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == trainer.max_steps:
            if self.profile:
                self.profile.disable()
                self.stats = pstats.Stats(self.profile)
                if self.device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start


def hook_rows(durations: dict[str, list[float]], steps: int) -> list[dict]:
    """Mean milliseconds per step of every per-step action, over the last `steps` calls of each."""
    rows = []
    for action, times in durations.items():
        if len(times) < steps:  # once-per-run actions (setup, fit start): not part of a step's cost
            continue
        ms = 1e3 * sum(times[-steps:]) / steps
        rows.append({"action": action, "ms_per_step": ms})
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def call_counts(stats: pstats.Stats, steps: int) -> dict:
    """Per step: the calls that wait for the device, by calling function, and the time spent in logging.

    An optimizer reading its CPU step counters (torch/optim `_get_value`, CPU only) is not a device sync.
    """
    syncs, log_ms = {}, 0.0
    for (filename, _, function), (_, _, _, cumulative, callers) in stats.stats.items():
        name = function.split("'")[1] if function.startswith("<method") else function
        if name in SYNC_CALLS and (function.startswith("<method") or "torch" in filename):
            for (caller_file, line, caller), (_, calls, *_) in callers.items():
                if not caller_file.endswith("torch/optim/optimizer.py"):
                    where = f"{name} <- {Path(caller_file).parent.name}/{Path(caller_file).name}:{line}({caller})"
                    syncs[where] = syncs.get(where, 0) + calls / steps
        if function in LOGGING_CALLS and ("lightning" in filename or "lmlab" in filename):
            log_ms += 1e3 * cumulative / steps
    return {"syncs_per_step": syncs, "log_ms_per_step": log_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--setup", choices=sorted(SETUPS), default="shipped")
    parser.add_argument("--top", type=int, default=25, help="actions shown")
    parser.add_argument("--name", default=None, help="results file: bench/results/NAME.json")
    args = parser.parse_args()
    quiet_lightning()

    # Timings without cProfile (it slows Python code several-fold), then a second run counting calls under it.
    durations, clock = profiled_fit(args.preset, args.steps, args.warmup, args.setup, profile_calls=False)
    plain_s = plain_step_seconds(args.preset, args.steps, args.warmup)
    _, counted = profiled_fit(args.preset, args.steps, args.warmup, args.setup, profile_calls=True)
    rows = hook_rows(durations, args.steps)
    counts = call_counts(counted.stats, args.steps)
    if torch.cuda.is_available():
        counts["cuda_syncs_per_step"] = counted.cuda_syncs
    step_s = clock.seconds / args.steps
    summary = {
        "preset": args.preset,
        "setup": args.setup,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": args.steps,
        "lmlab_ms_per_step": 1e3 * step_s,
        "plain_ms_per_step": 1e3 * plain_s,
        "overhead_ms_per_step": 1e3 * (step_s - plain_s),
        **counts,
    }
    print(table(rows[: args.top], ["action", "ms_per_step"]))
    print(f"\nlmlab {summary['lmlab_ms_per_step']:.2f} ms/step, plain loop {summary['plain_ms_per_step']:.2f} ms/step")
    print(f"logging (self.log and the loggers, under cProfile): {counts['log_ms_per_step']:.3f} ms/step")
    print("calls that wait for the device, per step:")
    for where, calls in sorted(counts["syncs_per_step"].items(), key=lambda item: -item[1]):
        print(f"  {calls:6.2f}  {where}")
    if "cuda_syncs_per_step" in counts:
        print("synchronizing CUDA calls per step (torch.cuda.set_sync_debug_mode):")
        for where, calls in sorted(counts["cuda_syncs_per_step"].items(), key=lambda item: -item[1]):
            print(f"  {calls:6.2f}  {where}")
    counted.stats.sort_stats("tottime").print_stats(15)
    name = args.name or f"overhead_profile_{args.preset}_{'cuda' if torch.cuda.is_available() else 'cpu'}"
    print("written to", write_results(name, {"summary": summary, "actions": rows}))


if __name__ == "__main__":
    main()
