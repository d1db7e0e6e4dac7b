"""Training throughput: lmlab's LightningModule through Trainer.fit against a plain PyTorch loop.

Both train the same model from the same initial weights on the same batches, with the same
optimizer (AdamW, decayed matrices only, fused on GPU), LR schedule (warmup + cosine), precision,
gradient clipping and compilation, in one process on one device, so their ratio is lmlab's
framework overhead. lmlab runs with the configuration a user gets (`--setup shipped`, the
default): the callbacks of conf/callbacks/default.yaml (checkpointing, LR monitor, progress bar,
tokens/s, NaN guard, interrupt handler, validation curve and samples), the TensorBoard logger of
conf/logger/tensorboard.yaml and the trainer settings of conf/trainer/default.yaml, read from the
YAML files themselves (no Hydra needed). The timed window covers training steps only: the plain
loop never validates, so neither side's validation passes are timed. `--setup bare` is the old
measurement: progress bar and tokens/s only, no logger, no checkpointing. `--setup barebones` is
Lightning's own `Trainer(barebones=True)`.

    python bench/throughput.py --preset gpt2-small          # one GPU: tokens/s, MFU, peak memory
    python bench/throughput.py --preset default             # the default CPU model
    python bench/throughput.py --preset lstm-medium --preset gru-medium

Repeats are interleaved (plain, lmlab, plain, lmlab, ...), so a machine whose speed drifts hits
both alike; `ratio` is the median of the per-repeat ratios, `best_ratio` best against best.

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6N + 12*L*H*Q*T (PaLM appendix B,
as in nanoGPT's estimate_mfu) and the peak bf16 dense rate of an H100/H200 SXM, 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

from lmlab.callbacks import SyncFreeProgressBar, TokenThroughput
from lmlab.metrics import token_nats
from lmlab.models import GPT, RecurrentLM, count_parameters, detach_state
from lmlab.optim import parameter_groups, warmup_cosine
from lmlab.perf import Perf, apply_perf, attention_context
from lmlab.run.precision import cpu_has_native_bf16
from lmlab.run.quiet import quiet_lightning
from lmlab.task import LanguageModelTask

CONF = Path(__file__).resolve().parents[1] / "conf"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]

H100_BF16_PEAK = 989e12


@dataclass
class Preset:
    build: callable
    vocab: int
    batch: int
    block: int
    precision: str
    compile: bool
    stateful: bool = False
    lr: float = 6e-4
    compile_mode: str | None = None
    loss_chunk_rows: int = 0
    attention: str = "auto"
    cuda_graphs: bool | str = "auto"  # perf.cuda_graphs, as shipped
    float8: bool = False  # perf.float8: torchao's FP8 linear layers, in both loops
    activation_checkpointing: bool = False  # perf.activation_checkpointing: blocks recomputed in backward, both loops
    extra: dict = field(default_factory=dict)


def medium_rnn(cell: str) -> Preset:
    """Zaremba et al.'s medium PTB setting (2 x 650 units, dropout 0.5, batch 20 x 35 steps, state
    carried across batches) with a `cell` ("lstm" or "gru") recurrence."""
    return Preset(
        lambda v, b: RecurrentLM(v, cell=cell, d_model=650, n_layer=2, dropout=0.5),
        vocab=10000,
        batch=20,
        block=35,
        precision="32-true",
        compile=False,
        stateful=True,
        lr=1e-3,
    )


PRESETS = {
    "gpt2-small": Preset(
        lambda v, b: GPT(v, d_model=768, n_layer=12, n_head=12, block_size=b, pad_vocab_to=64),
        vocab=50257,
        batch=32,
        block=1024,
        precision="bf16-mixed",
        compile=True,
    ),
    "default": Preset(  # bf16 where the CPU has it natively, as the shipped trainer.precision=auto
        lambda v, b: GPT(v, d_model=128, n_layer=3, n_head=4, block_size=b),
        vocab=66,
        batch=32,
        block=64,
        precision="bf16-mixed",
        compile=False,
        lr=4e-3,
    ),
    "tiny": Preset(  # a step of a few ms on a CPU, so the framework's fixed cost shows as it does on a GPU
        lambda v, b: GPT(v, d_model=64, n_layer=2, n_head=2, block_size=b),
        vocab=65,
        batch=8,
        block=32,
        precision="32-true",
        compile=False,
        lr=1e-3,
    ),
    "char-gpt": Preset(  # a small character model on a GPU (bf16; on a CPU only where native)
        lambda v, b: GPT(v, d_model=256, n_layer=4, n_head=4, block_size=b),
        vocab=65,
        batch=64,
        block=128,
        precision="bf16-mixed",
        compile=False,
        lr=1e-3,
    ),
    "lstm-medium": medium_rnn("lstm"),
    "gru-medium": medium_rnn("gru"),
}


def perf_of(p: Preset) -> Perf:
    """The preset's speed switches (conf/train.yaml's perf node), for both loops."""
    return Perf(
        compile=p.compile,
        compile_mode=p.compile_mode,
        float8=p.float8,
        attention=p.attention,
        cuda_graphs=p.cuda_graphs,
        activation_checkpointing=p.activation_checkpointing,
    )


def batches(p: Preset, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    seq = [torch.randint(0, p.vocab, (p.batch, p.block + 1), generator=g) for _ in range(n)]
    pin = device.type == "cuda"
    return [(s[:, :-1].pin_memory() if pin else s[:, :-1], s[:, 1:].pin_memory() if pin else s[:, 1:]) for s in seq]


def optimizer_factory(p: Preset, device: torch.device):
    return partial(torch.optim.AdamW, lr=p.lr, betas=(0.9, 0.95), weight_decay=0.1)


SCHEDULE = partial(warmup_cosine, warmup_steps=100, min_lr_ratio=0.1)  # conf/scheduler/cosine.yaml


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def precision(p: Preset, device: torch.device) -> str:
    """The preset's precision, for both loops; on a CPU bf16 only where it is native (lmlab's `auto`)."""
    if device.type == "cuda" or (p.precision.startswith("bf16") and cpu_has_native_bf16()):
        return p.precision
    return "32-true"


def plain_loop(p: Preset, model: torch.nn.Module, data, warmup: int, device: torch.device) -> float:
    """The reference: the loop a careful engineer writes by hand. Returns seconds for the timed steps."""
    model = model.to(device).train()
    apply_perf(model, perf_of(p))  # FP8 layers, activation checkpointing: as lmlab applies them
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = optimizer_factory(p, device)(parameter_groups(model, 0.1), **fused)
    schedule = SCHEDULE(opt, total_steps=len(data))
    attention = attention_context(p.attention)

    def loss_fn(x, y, state):
        logits, state = model(x, state)
        return token_nats(logits, y, reduction="mean", chunk_rows=p.loss_chunk_rows), state

    loss_fn = torch.compile(loss_fn, mode=p.compile_mode) if p.compile else loss_fn
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision(p, device).startswith("bf16"))
    state = None
    for i, (x, y) in enumerate(data):
        if i == warmup:
            sync(device)
            start = clock()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast, attention(x):
            loss, state = loss_fn(x, y, state if p.stateful else None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        state = detach_state(state)
    sync(device)
    return clock() - start


class StepTimer(pl.Callback):
    """From the start of batch `warmup` to the end of the last batch: training steps only, with every
    other callback's per-step work inside the window (Lightning runs checkpoint callbacks last, so only
    their work on the final batch falls outside it)."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.last, self.device, self.seconds = warmup, steps - 1, device, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(self.device)
            self.start = clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.last + 1:
            sync(self.device)
            self.seconds = clock() - self.start


def _resolve(node, out_dir: Path):
    """The few interpolations of conf/callbacks, conf/logger and conf/trainer, resolved without Hydra."""
    if isinstance(node, dict):
        return {key: _resolve(value, out_dir) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(value, out_dir) for value in node]
    if isinstance(node, str) and "${" in node:
        if node == "${sample}":
            return yaml.safe_load((CONF / "sample" / "default.yaml").read_text())
        node = node.replace("${paths.output_dir}", str(out_dir))
        if "${" in node:
            raise ValueError(f"bench/throughput.py cannot resolve {node!r} from conf/: add it to _resolve")
    return node


def _instantiate(node):
    """`_target_` nodes built bottom-up, as hydra.utils.instantiate does for these plain nodes."""
    if isinstance(node, list):
        return [_instantiate(value) for value in node]
    if not isinstance(node, dict):
        return node
    args = {key: _instantiate(value) for key, value in node.items() if key not in ("_target_", "defaults")}
    if "_target_" not in node:
        return args
    module, _, name = node["_target_"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**args)


RUN_LENGTH_KEYS = ("_target_", "defaults", "accelerator", "devices", "strategy", "precision", "max_steps", "max_time")
RUN_LENGTH_KEYS += ("max_epochs", "val_check_interval", "check_val_every_n_epoch", "limit_val_batches")
RUN_LENGTH_KEYS += ("limit_test_batches", "num_sanity_val_steps")


def shipped_setup(out_dir: Path) -> dict:
    """Trainer arguments as `python train.py` builds them: callbacks, logger and trainer settings from conf/."""
    load = lambda *parts: _resolve(yaml.safe_load(CONF.joinpath(*parts).read_text()), out_dir)  # noqa: E731
    trainer = {key: value for key, value in load("trainer", "default.yaml").items() if key not in RUN_LENGTH_KEYS}
    return {
        **_instantiate(trainer),
        "callbacks": list(_instantiate(load("callbacks", "default.yaml")).values()),
        "logger": list(_instantiate(load("logger", "tensorboard.yaml")).values()),
    }


def bare_setup(out_dir: Path) -> dict:
    """The earlier measurement: progress bar and tokens/s only, no logger, no checkpointing."""
    return {
        "callbacks": [SyncFreeProgressBar(), TokenThroughput()],
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "gradient_clip_val": 1.0,
        "default_root_dir": str(out_dir),
    }


def barebones_setup(out_dir: Path) -> dict:
    """Lightning's leanest loop, `Trainer(barebones=True)`: no logging, progress bar, checkpointing or
    model summary. What Lightning's loop alone costs over the plain loop."""
    return {"callbacks": [], "barebones": True, "gradient_clip_val": 1.0, "default_root_dir": str(out_dir)}


SETUPS = {"shipped": shipped_setup, "bare": bare_setup, "barebones": barebones_setup}


class TimedLoader:
    """Wraps a loader and adds up the time the training loop spends waiting in `next()`."""

    def __init__(self, loader, warmup: int) -> None:
        self.loader, self.warmup, self.waiting = loader, warmup, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        yield from self._timed(iter(self.loader))

    def _timed(self, iterator):
        i = 0
        while True:
            start = clock()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            if i >= self.warmup:
                self.waiting += clock() - start
            i += 1
            yield batch


def real_data_loader(p: Preset, steps: int):
    """Shuffled windows of the bundled corpus, batched by lmlab's own data module."""
    from lmlab.data import TextDataModule
    from lmlab.tokenizers import CharTokenizer

    corpus = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
    dm = TextDataModule(
        CharTokenizer(), str(corpus), block_size=p.block, batch_size=p.batch, cache_dir=str(Path(tempfile.mkdtemp()))
    )
    dm.prepare_data()
    return dm.train_dataloader()


class BenchData(pl.LightningDataModule):
    """The fixed batches as a data module, with the attributes lmlab's callbacks read from one."""

    def __init__(self, loader, block_size: int) -> None:
        super().__init__()
        self.loader, self.block_size, self.train_bytes_per_token = loader, block_size, 1.0

    def train_dataloader(self):
        return self.loader


def bench_trainer(
    p: Preset, device: torch.device, steps: int, setup: dict, clock: pl.Callback, **options
) -> pl.Trainer:
    """A one-device Trainer of `steps` training steps and no validation, with the `setup` arguments
    (SETUPS) and `clock` after their callbacks; `options` are further Trainer arguments."""
    setup["callbacks"].append(clock)
    return pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision(p, device),
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **options,
        **setup,
    )


def lightning_loop(
    p: Preset, model: torch.nn.Module, data, warmup: int, device: torch.device, loader=None, setup: str = "shipped"
) -> float:
    """lmlab's path: LanguageModelTask + Trainer.fit, set up as `setup` says (the shipped configuration)."""
    perf = perf_of(p)
    apply_perf(model, perf)
    task = LanguageModelTask(
        model,
        optimizer=optimizer_factory(p, device),
        scheduler=SCHEDULE,
        weight_decay=0.1,
        stateful=p.stateful,
        loss_chunk_rows=p.loss_chunk_rows,
        perf=perf,
    )
    timer = StepTimer(warmup, len(data), device)
    loader = loader or torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    out_dir = Path(tempfile.mkdtemp(prefix="lmlab-throughput-"))
    trainer = bench_trainer(p, device, len(data), SETUPS[setup](out_dir), timer)
    trainer.fit(task, datamodule=BenchData(loader, p.block))
    return timer.seconds


def run(name: str, args: argparse.Namespace) -> dict:
    """Interleaved repeats of the plain loop and lmlab on one preset, with the command line's overrides."""
    overrides = {
        "batch": args.batch,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "loss_chunk_rows": args.loss_chunk_rows,
        "attention": args.attention,
        "cuda_graphs": {"true": True, "false": False, "auto": "auto", None: None}[args.cuda_graphs],
        "float8": args.float8,
        "activation_checkpointing": args.activation_checkpointing,
    }
    p = Preset(**{**PRESETS[name].__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    model = p.build(p.vocab, p.block)
    data = batches(p, args.warmup + args.steps, device)
    tokens = args.steps * p.batch * p.block
    times = {"plain": [], "lmlab": []}
    peak = {}
    loops = {"plain": plain_loop, "lmlab": partial(lightning_loop, setup=args.setup)}
    if not args.plain:  # lmlab alone (bench/nanogpt_side_by_side.py compares it with nanoGPT instead)
        del loops["plain"]
    for _ in range(args.repeats):  # interleaved, so drifting clocks or a shared machine hit both alike
        for which, loop in loops.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[which].append(loop(p, copy.deepcopy(model), data, args.warmup, device))
            if device.type == "cuda":
                peak[which] = torch.cuda.max_memory_allocated() / 2**30
    real = {}
    if args.real_data:  # the same model fed by lmlab's data module: how long does the loop wait for batches?
        timed = TimedLoader(real_data_loader(p, args.warmup + args.steps), args.warmup)
        seconds = lightning_loop(p, copy.deepcopy(model), data, args.warmup, device, loader=timed, setup=args.setup)
        real = {"real_data_tok_s": tokens / seconds, "data_wait": timed.waiting / seconds}
    best = {k: min(v) for k, v in times.items() if v}
    row = {
        "preset": name,
        "setup": args.setup,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "params": count_parameters(model),
        "batch": p.batch,
        "block": p.block,
        "precision": precision(p, device),
        "compile": p.compile and (p.compile_mode or "default"),
        "loss_chunk_rows": p.loss_chunk_rows,
        "float8": p.float8,
        "activation_checkpointing": p.activation_checkpointing,
        "attention": p.attention,
        "cuda_graphs": p.cuda_graphs,
        "lmlab_tok_s": tokens / best["lmlab"],
        "ms_per_step": 1000 * best["lmlab"] / args.steps,
    }
    if args.plain:
        row["plain_tok_s"] = tokens / best["plain"]
        row["plain_ms_per_step"] = 1000 * best["plain"] / args.steps
        row["ratio"] = statistics.median(a / b for a, b in zip(times["plain"], times["lmlab"]))
        row["best_ratio"] = best["plain"] / best["lmlab"]
        row["ratios"] = [round(a / b, 4) for a, b in zip(times["plain"], times["lmlab"])]
    if hasattr(model, "flops_per_token") and device.type == "cuda":
        row["mfu"] = row["lmlab_tok_s"] * model.flops_per_token() / H100_BF16_PEAK
        if args.plain:
            row["plain_mfu"] = row["plain_tok_s"] * model.flops_per_token() / H100_BF16_PEAK
    if peak:
        row["peak_gib"] = peak["lmlab"]
    return {**row, **real}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--setup", choices=sorted(SETUPS), default="shipped", help="lmlab's callbacks and logger")
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True, help="time the plain loop")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--loss-chunk-rows", type=int, default=None, help="chunked fp32 cross-entropy (0: off)")
    parser.add_argument("--attention", default=None, help="auto, cudnn, flash, efficient or math")
    parser.add_argument(
        "--float8", action=argparse.BooleanOptionalAction, default=None, help="FP8 linear layers (torchao), both loops"
    )
    parser.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute each block's activations in the backward pass (less memory, more compute), both loops",
    )
    parser.add_argument(
        "--cuda-graphs", choices=["auto", "true", "false"], default=None, help="perf.cuda_graphs (shipped: auto)"
    )
    parser.add_argument(
        "--real-data",
        action="store_true",
        help="also train on Tiny Shakespeare through lmlab's data module and report the data wait",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: this process's CPU time instead of wall time, for a CPU shared with other jobs (with --threads 1)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--name", default="throughput", help="results file: bench/results/NAME.json")
    return parser


COLUMNS = ["preset", "setup", "device", "params", "batch", "block", "precision", "compile", "loss_chunk_rows", "float8"]
COLUMNS += [
    "activation_checkpointing",
    "attention",
    "cuda_graphs",
    "plain_tok_s",
    "lmlab_tok_s",
    "ratio",
    "best_ratio",
    "ms_per_step",
    "mfu",
    "peak_gib",
]
COLUMNS += ["real_data_tok_s", "data_wait"]


def main() -> None:
    args = parser().parse_args()
    quiet_lightning()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run(name, args) for name in args.preset]
    print(table(rows, COLUMNS))
    settings = {key: value for key, value in vars(args).items() if key != "name"}
    print("written to", write_results(args.name, {"settings": settings, "rows": rows}))


if __name__ == "__main__":
    main()
