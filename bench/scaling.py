"""Scaling over GPUs: tokens/s and peak memory per GPU under DDP and FSDP, and a kill-and-resume check.

Throughput: GPT-2-small (124M, context 1024) and a ~1B Llama (TinyLlama's shape: d_model 2048, 22
layers, 32 heads, 4 KV heads, 1.1B parameters) train on random tokens for `--steps` timed steps after
`--warmup` untimed ones (compilation, allocator warm-up), bf16 mixed precision, AdamW, under the
strategies of conf/trainer/ddp.yaml and conf/trainer/fsdp.yaml (composed by Hydra, as `train.py`
composes them). Each row is one configuration in its own process (Lightning starts the other ranks);
efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU), the 1-GPU row being the same model
without a distributed strategy. `data.batch_size` is per GPU, so N GPUs train on N x the tokens per step.

Resume: the lmlab training path (TextDataModule on Tiny Shakespeare, LanguageModelTask, the FSDP
preset, sharded checkpoints every `--ckpt-every` steps) runs `--resume-steps` steps straight; a second
run is killed with SIGKILL on every rank right after the checkpoint of step `--kill-at`; a third
resumes it from `last.ckpt`. The losses after the restart are compared step by step with the
straight run's, and the sharded checkpoint is read back in one process as generate.py reads it.

    python bench/scaling.py --gpus 1,2                          # both models, DDP and FSDP, then the resume check
    python bench/scaling.py --gpus 1,2,4,8 --resume-model llama-1b   # issue 15, on 8 GPUs
    python bench/scaling.py --tiny --gpus 1 --strategies ddp    # a CPU smoke test of this script
    python bench/scaling.py --gpus 2 --strategies ddp --set trainer.strategy.bucket_cap_mb=100   # a DDP setting
    python bench/scaling.py --gpus 1,2 --strategies ddp --models gpt2-small --batch 32 --set perf.compile_ddp=whole

`--budget-s` bounds the whole run: configurations that would start after it are reported as skipped.
Results: RESULTS/scaling.json (bench/results/, or $LMLAB_RESULTS_DIR) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, table, write_results

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM, the MFU denominator
MODELS = {  # name: (model config choice, its settings, vocab size, per-GPU batch, context)
    "gpt2-small": ("gpt", dict(d_model=768, n_layer=12, n_head=12), 50304, 16, 1024),
    "llama-1b": ("llama", dict(d_model=2048, n_layer=22, n_head=32, n_kv_head=4, d_ff=5632), 32000, 8, 1024),
    "tiny": ("gpt", dict(d_model=64, n_layer=2, n_head=2), 256, 4, 64),  # --tiny: a CPU smoke test
}


def compose_run(model: str, strategy: str, devices: int, out_dir: Path, tiny: bool, extra: tuple[str, ...] = ()):
    """The config `train.py model=<m> trainer=<preset> ...` composes: the presets under test, the model as built."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from lmlab.cli import register_resolvers

    register_resolvers()
    choice, settings, _, _, context = MODELS[model]
    preset = {"single": "gpu", "ddp": "ddp", "fsdp": "fsdp"}[strategy]
    overrides = [f"model={choice}", *(f"model.{k}={v}" for k, v in settings.items()), f"data.block_size={context}"]
    overrides += [f"trainer={preset}", f"trainer.devices={devices}", "trainer.precision=bf16-mixed"]
    if tiny:  # CPU: nothing to gain from bf16 autocast; DDP over gloo
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    # CUDA graphs replay a step on one GPU only: off here, so the 1-GPU row runs the step the N-GPU rows run
    overrides += ["task.scheduler.warmup_steps=10", "perf.cuda_graphs=false", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.trainer.default_root_dir = str(out_dir)
        cfg.paths.output_dir = str(out_dir)
        # what the run's checkpoints record of its choices (Hydra fills these in a real run)
        cfg.names = {"model": choice, "tokenizer": "char", "data": "text", "optimizer": "adamw", "scheduler": "cosine"}
    return cfg


class RandomTokens(IterableDataset):
    """Endless (x, y) windows of uniformly random ids, different on every rank: throughput needs no text."""

    def __init__(self, vocab_size: int, context: int, seed: int) -> None:
        self.vocab_size, self.context, self.seed = vocab_size, context, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            ids = torch.randint(0, self.vocab_size, (self.context + 1,), generator=generator)
            yield ids[:-1], ids[1:]


class StepTimer(pl.Callback):
    """Wall time of `steps` optimizer steps after `warmup`, the device synchronised at both ends, and the
    peak memory allocated during them."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.seconds, self.peak_bytes, self._start = 0.0, 0, 0.0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and not self._start:  # once: accumulation ends k batches here
            self._sync(pl_module)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self._start = time.perf_counter()
        elif trainer.global_step == self.warmup + self.steps:
            self._sync(pl_module)
            self.seconds = time.perf_counter() - self._start
            if pl_module.device.type == "cuda":
                self.peak_bytes = torch.cuda.max_memory_allocated(pl_module.device)


def throughput_worker(args: argparse.Namespace) -> None:
    """One configuration (this process is rank 0; Lightning starts the others): writes `args.json`."""
    from lmlab.run.build import build

    torch.manual_seed(0)
    _, _, vocab_size, batch, context = MODELS[args.model]
    batch = args.batch or batch
    cfg = compose_run(
        args.model,
        args.strategy,
        args.devices,
        Path(args.json).parent,
        args.tiny,
        (f"perf.compile={args.compile}", *args.set),
    )
    model = build(cfg.model, "model", vocab_size=vocab_size)
    timer = StepTimer(args.warmup, args.steps)
    trainer = build(
        cfg.trainer,
        "trainer",
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        val_check_interval=None,
    )
    task = build(cfg.task, "task", model=model)  # AdamW (decayed matrices only), warmup + cosine
    params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.flops_per_token(context)
    seed = 1000 + int(os.environ.get("LOCAL_RANK", 0)) + 100 * int(os.environ.get("NODE_RANK", 0))
    loader = DataLoader(RandomTokens(model.vocab_size, context, seed), batch_size=batch, num_workers=1)
    trainer.fit(task, train_dataloaders=loader)
    peak = trainer.strategy.all_gather(torch.tensor(float(timer.peak_bytes), device=trainer.strategy.root_device))
    if not trainer.is_global_zero:
        return
    world = trainer.world_size
    accumulate = trainer.accumulate_grad_batches  # micro-batches per timed (optimizer) step
    tokens_per_s = args.steps * accumulate * batch * context * world / timer.seconds
    result = {
        "model": args.model,
        "params": params,
        "strategy": args.strategy,
        "gpus": world,
        "batch_per_gpu": batch,
        "accumulate_grad_batches": accumulate,
        "context": context,
        "compiled": args.compile,
        "compile_ddp": cfg.perf.compile_ddp if args.compile and world > 1 else None,
        "step_s": timer.seconds / args.steps,
        "tokens_per_s": tokens_per_s,
        "peak_mem_gib_per_gpu": float(peak.max()) / 2**30,
        "mfu": tokens_per_s * flops_per_token / (world * H100_BF16_PEAK)
        if trainer.strategy.root_device.type == "cuda"
        else None,
    }
    Path(args.json).write_text(json.dumps(result))


class KillAt(pl.Callback):
    """SIGKILL on every rank as the step after `step` starts: the checkpoint of `step` is on disk (it is
    written at the end of that step), nothing after it is, and no handler runs, as in a node failure."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            trainer.strategy.barrier()  # every rank has finished writing its shards of the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)


class LossLog(pl.Callback):
    """Rank 0's training loss at every step, appended to a JSON-lines file (a killed run keeps its lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")


def resume_worker(args: argparse.Namespace) -> None:
    """One of the resume check's runs (`--phase straight|killed|resumed`) of the lmlab training path."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lmlab.callbacks import SelfContainedCheckpoints
    from lmlab.checkpoint import run_record
    from lmlab.data import TextDataModule
    from lmlab.run.build import build
    from lmlab.tokenizers import CharTokenizer

    run_dir = Path(args.run_dir)
    pl.seed_everything(0, verbose=False)
    _, _, _, batch, context = MODELS[args.model]
    data = TextDataModule(
        CharTokenizer(),
        str(ROOT / "data" / "tinyshakespeare.txt"),
        block_size=context,
        batch_size=batch,
        cache_dir=str(run_dir.parent / "cache"),
        seed=0,
    )
    data.prepare_data()
    cfg = compose_run(args.model, args.strategy, args.devices, run_dir, args.tiny)
    model = build(cfg.model, "model", vocab_size=data.tokenizer.vocab_size)
    callbacks = [
        SelfContainedCheckpoints(run_record(cfg, data.tokenizer)),  # readable by generate.py / evaluate.py
        LossLog(run_dir / "losses.jsonl"),
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints", every_n_train_steps=args.ckpt_every, save_top_k=0, save_last=True
        ),
    ]
    if args.phase == "killed":
        callbacks.append(KillAt(args.kill_at))
    trainer = build(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        max_steps=args.resume_steps,
        limit_val_batches=0,
        val_check_interval=None,
    )
    task = build(cfg.task, "task", model=model)
    ckpt = str(run_dir / "checkpoints" / "last.ckpt") if args.phase == "resumed" else None
    trainer.fit(task, datamodule=data, ckpt_path=ckpt, weights_only=True)


def _worker_command(args: argparse.Namespace, mode: str, **settings) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode]
    for key, value in settings.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    command += [f"--set={override}" for override in args.set]
    command += ["--batch", str(args.batch)] if args.batch else []
    return command + (["--tiny"] if args.tiny else []) + ([] if args.compile else ["--no-compile"])


def _run(command: list[str], timeout: float, log: Path) -> int:
    with log.open("w") as out:
        try:
            return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            return -1


def throughput(args: argparse.Namespace, work: Path, deadline: float) -> list[dict]:
    rows = []
    for model in args.models:
        for gpus in args.gpus:
            for strategy in ["single"] if gpus == 1 else args.strategies:
                name = f"{model}-{strategy}-{gpus}"
                if time.monotonic() > deadline:
                    rows.append({"model": model, "strategy": strategy, "gpus": gpus, "status": "skipped (budget)"})
                    continue
                path = work / f"{name}.json"
                started = time.monotonic()
                command = _worker_command(
                    args, "throughput", model=model, strategy=strategy, devices=gpus, json=path
                ) + ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                code = _run(command, max(30.0, deadline - time.monotonic() + 60), work / f"{name}.log")
                row = json.loads(path.read_text()) if code == 0 and path.is_file() else {}
                row = {"model": model, "strategy": strategy, "gpus": gpus, **row}
                row["status"] = "ok" if row.get("tokens_per_s") else f"failed (exit {code}, see {name}.log)"
                row["wall_s"] = round(time.monotonic() - started, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["gpus"] == 1 and r.get("tokens_per_s")), None)
        if base and row.get("tokens_per_s"):
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["efficiency"] = row["speedup"] / row["gpus"]
    return rows


def resume_check(args: argparse.Namespace, work: Path, deadline: float) -> dict:
    """Straight run, killed run, resumed run; the losses after the restart against the straight run's."""
    from lmlab.checkpoint.format import is_sharded, load_checkpoint

    result = {"model": args.resume_model, "strategy": args.resume_strategy, "gpus": max(args.gpus)}
    for phase in ("straight", "killed", "resumed"):
        if time.monotonic() > deadline:
            return {**result, "status": f"skipped (budget) before the {phase} run"}
        run_dir = work / ("straight" if phase == "straight" else "interrupted")
        run_dir.mkdir(parents=True, exist_ok=True)
        command = _worker_command(
            args,
            "resume",
            model=args.resume_model,
            strategy=args.resume_strategy,
            devices=max(args.gpus),
            run_dir=run_dir,
            phase=phase,
            kill_at=args.kill_at,
            ckpt_every=args.ckpt_every,
            resume_steps=args.resume_steps,
        )
        code = _run(command, max(30.0, deadline - time.monotonic() + 120), work / f"resume-{phase}.log")
        result[f"{phase}_exit"] = code
        if code != (-signal.SIGKILL if phase == "killed" else 0):
            return {**result, "status": f"failed in the {phase} run (exit {code}, see resume-{phase}.log)"}

    def losses(run: str) -> dict[int, float]:
        lines = (work / run / "losses.jsonl").read_text().splitlines()
        return {row["step"]: row["loss"] for row in map(json.loads, lines)}

    straight, interrupted = losses("straight"), losses("interrupted")
    after = [step for step in straight if step > args.kill_at]
    if sorted(interrupted) != sorted(straight):
        return {**result, "status": f"the interrupted run logged steps {sorted(interrupted)}"}
    diffs = [abs(interrupted[step] - straight[step]) for step in after]
    last = work / "interrupted" / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    loaded = load_checkpoint(last)  # as generate.py / evaluate.py read it: one process, no process group
    return {
        **result,
        "kill_at": args.kill_at,
        "steps": args.resume_steps,
        "max_abs_loss_diff_after_restart": max(diffs),
        "identical_after_restart": max(diffs) == 0.0,
        "sharded_checkpoint": is_sharded(last),
        "checkpoint_step": loaded.step,
        "checkpoint_read_s": round(time.perf_counter() - started, 2),
        "losses_straight": [straight[s] for s in sorted(straight)],
        "losses_resumed": [interrupted[s] for s in sorted(interrupted)],
        "status": "ok",
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda kind: lambda text: [kind(item) for item in text.split(",")]  # noqa: E731
    p.add_argument("--gpus", type=csv(int), default=[1, 2], help="GPU counts, e.g. 1,2,4,8")
    p.add_argument("--models", type=csv(str), default=["gpt2-small", "llama-1b"])
    p.add_argument("--strategies", type=csv(str), default=["ddp", "fsdp"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation, allocator)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager (default: perf.compile)")
    p.add_argument(
        "--batch", type=int, help="sequences per GPU per step (default: the model's, e.g. 16 for gpt2-small)"
    )
    p.add_argument("--no-resume", dest="resume", action="store_false", help="skip the kill-and-resume check")
    p.add_argument("--resume-only", action="store_true", help="only the kill-and-resume check, on max(--gpus) GPUs")
    p.add_argument("--resume-model", default="gpt2-small")
    p.add_argument("--resume-strategy", default="fsdp")
    p.add_argument("--resume-steps", type=int, default=40)
    p.add_argument("--kill-at", type=int, default=20)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=3600.0, help="start nothing after this many seconds")
    p.add_argument("--name", default="scaling", help="results file: RESULTS/<name>.json")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="a train.py override for the throughput rows, e.g. trainer.strategy.static_graph=true",
    )
    p.add_argument("--tiny", action="store_true", help="a 2-layer GPT on CPU: checks this script, measures nothing")
    p.add_argument("--worker", choices=["throughput", "resume"], help=argparse.SUPPRESS)
    for hidden in ("--model", "--strategy", "--json", "--run-dir", "--phase"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.tiny:
        args.models, args.resume_model = ["tiny"], "tiny"
    if args.worker == "throughput":
        return throughput_worker(args)
    if args.worker == "resume":
        return resume_worker(args)
    deadline = time.monotonic() + args.budget_s
    work = Path(tempfile.mkdtemp(prefix="lmlab-scaling-"))
    rows = [] if args.resume_only else throughput(args, work, deadline)
    resume = resume_check(args, work, deadline) if args.resume else None
    columns = ["model", "strategy", "gpus", "tokens_per_s", "speedup", "efficiency", "peak_mem_gib_per_gpu", "mfu"]
    if rows:
        print(table(rows, [*columns, "status"]))
    if resume:
        print(json.dumps({k: v for k, v in resume.items() if not k.startswith("losses")}, indent=2))
    path = write_results(args.name + ("_tiny" if args.tiny else ""), {"throughput": rows, "resume": resume})
    for log in sorted(work.glob("*.log")):  # the workers' logs beside the results, for failed rows
        (path.parent / f"{args.name}-{log.name}").write_text(log.read_text()[-20000:])
    print(f"results: {path}")


if __name__ == "__main__":
    main()
