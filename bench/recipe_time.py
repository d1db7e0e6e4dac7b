"""How long an experiment recipe (a multirun) takes, estimated from a few timed steps of each job.

    python bench/recipe_time.py compare_architectures                 # every job of the recipe
    python bench/recipe_time.py scaling --timed-steps 3 --only model=gpt   # a quick check on some jobs
    python bench/recipe_time.py compare_architectures_gpu --device cuda   # bf16 autocast where the recipe uses it

For every distinct job of the recipe's sweep (jobs differing only in the learning rate or the seed
cost the same and are timed once), this builds the job's tokenizer, data and parameter-matched
model exactly as `train.py` does, works out its step count from the recipe's budget
(budget.max_bytes or budget.max_flops, lmlab.run.budgets), times `--timed-steps` AdamW training steps
and a few evaluation batches on real batches, and adds the validation passes, the test pass and a
fixed start-up cost per job (`--overhead-s`: Hydra, Lightning, checkpoints and the sample).
Torch threads are pinned to `--threads`, as the CPU recipes pin them (lmlab.callbacks.CpuThreads).
On a CPU shared with other jobs, wall time per step measures the other jobs too; with one thread the
process's CPU time per step is what the step costs on an idle machine, so CPU estimates use it (both
are printed). Prints one row per job and the total; writes bench/results/recipe_time_<recipe>_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, table, write_results

from lmlab.cli import register_resolvers
from lmlab.metrics import token_nats
from lmlab.run.build import build
from lmlab.run.plan import resolve_run

FREE = ("task.optimizer.lr", "seed")  # swept settings that do not change a job's cost


def sweep_jobs(recipe: str, only: list[str]) -> list[tuple[list[str], int]]:
    """(overrides, how many jobs of the sweep share that cost) for every distinct job of the recipe."""
    cfg = _compose([f"experiment={recipe}"])
    params = {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}
    costly = {key: values for key, values in params.items() if key not in FREE}
    repeats = math.prod(len(values) for key, values in params.items() if key in FREE)
    jobs = []
    for combo in itertools.product(*costly.values()):
        overrides = [f"{key}={value}" for key, value in zip(costly, combo)]
        if all(o in overrides for o in only):
            jobs.append((overrides, repeats))
    return jobs


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def time_job(overrides: list[str], recipe: str, device: str, timed_steps: int) -> dict:
    """The job's step count and its measured seconds per training step and per evaluation batch."""
    cfg = _compose([f"experiment={recipe}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(ROOT / "outputs" / "recipe_time")
    tokenizer = build(cfg.tokenizer, "tokenizer")
    data = build(cfg.data, "data", tokenizer=tokenizer, seed=cfg.seed)
    data.prepare_data()
    cfg = resolve_run(cfg, data)  # matched width and step budget, as train.py plans them
    model = build(cfg.model, "model", vocab_size=data.tokenizer.vocab_size).to(device)
    steps = int(cfg.trainer.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bf16 = device == "cuda" and str(cfg.trainer.precision).startswith("bf16")
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    train = data.train_set()
    starts = torch.randint(0, len(train), (timed_steps + 2, data.batch_size)).tolist()

    def step(batch_starts: list[int]) -> None:
        x, y = (t.to(device) for t in train.__getitems__(batch_starts))
        with autocast():
            logits, _ = model(x, None)
            loss = token_nats(logits, y, reduction="mean")
            aux = model.aux_loss()
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for s in starts[:2]:  # warm-up: allocator, kernels
        step(s)
    _sync(device)
    began, cpu_began = time.perf_counter(), time.process_time()
    for s in starts[2:]:
        step(s)
    _sync(device)
    wall_s, cpu_s = (time.perf_counter() - began) / timed_steps, (time.process_time() - cpu_began) / timed_steps
    evaluation = data.eval_set("val")
    size = data.eval_batch_size
    batches = [evaluation[i * size : (i + 1) * size] for i in range(min(3, math.ceil(len(evaluation) / size)))]
    model.eval()
    with torch.no_grad():
        began, cpu_began = time.perf_counter(), time.process_time()
        for x, _ in batches:
            with autocast():
                model(x.to(device), None)
        _sync(device)
    clock = time.process_time() - cpu_began if device == "cpu" else time.perf_counter() - began
    eval_s = clock / max(1, len(batches))
    corpus = data.corpus
    val_batches = math.ceil(corpus.split_tokens["val"] / (data.eval_batch_size * data.block_size))
    test_batches = math.ceil(corpus.split_tokens["test"] / (data.eval_batch_size * data.block_size))
    validations = steps // int(cfg.trainer.val_check_interval) + 1  # and one more on the best checkpoint at worst
    return {
        "job": ",".join(overrides),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "wall ms/step": 1000 * wall_s,
        "ms/step": 1000 * (cpu_s if device == "cpu" else wall_s),
        "ms/eval batch": 1000 * eval_s,
        "eval batches": validations * val_batches + test_batches,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="an experiment name (conf/experiment/<name>.yaml)")
    parser.add_argument("--timed-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overhead-s", type=float, default=5.0, help="start-up and end-of-run cost of one job")
    parser.add_argument("--only", nargs="*", default=[], help="time only jobs with these overrides, e.g. model=gpt")
    args = parser.parse_args()
    register_resolvers()
    torch.set_num_threads(args.threads)
    rows = []
    for overrides, repeats in sweep_jobs(args.recipe, args.only):
        row = time_job(overrides, args.recipe, args.device, args.timed_steps)
        seconds = row["steps"] * row["ms/step"] / 1000 + row["eval batches"] * row["ms/eval batch"] / 1000
        row.update({"jobs": repeats, "s/job": seconds + args.overhead_s})
        row["s total"] = row["s/job"] * repeats
        rows.append(row)
        print(table([row], list(row)), flush=True)
    total = sum(row["s total"] for row in rows)
    columns = ["job", "params", "steps", "wall ms/step", "ms/step", "ms/eval batch", "eval batches", "jobs", "s/job"]
    columns.append("s total")
    print(table(rows, columns))
    print(f"\nestimated total: {total / 60:.1f} min for {sum(r['jobs'] for r in rows)} jobs ({args.threads} threads)")
    path = write_results(
        f"recipe_time_{args.recipe}_{args.device}", {"args": vars(args), "rows": rows, "total_s": total}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
