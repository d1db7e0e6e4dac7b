"""Training throughput: lmlab's LightningModule through Trainer.fit against a plain PyTorch loop.

Both train the same model from the same initial weights on the same batches, with the same
optimizer (AdamW, decayed matrices only, fused on GPU), precision, gradient clipping and
compilation, in one process on one device, so their ratio is lmlab's framework overhead.

    python bench/throughput.py --preset gpt2-small          # one GPU: tokens/s, MFU, peak memory
    python bench/throughput.py --preset default             # the default CPU model
    python bench/throughput.py --preset lstm-medium --preset gru-medium

MFU = tokens/s x FLOPs per token / peak, with FLOPs per token = 6N + 12*L*H*Q*T (PaLM appendix B,
as in nanoGPT's estimate_mfu) and the peak bf16 dense rate of an H100 SXM, 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

from lmlab.callbacks import SyncFreeProgressBar, TokenThroughput
from lmlab.models import GPT, RecurrentLM, count_parameters, detach_state
from lmlab.optim import parameter_groups
from lmlab.task import LanguageModelTask

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
    extra: dict = field(default_factory=dict)


PRESETS = {
    "gpt2-small": Preset(
        lambda v, b: GPT(v, d_model=768, n_layer=12, n_head=12, block_size=b, pad_vocab_to=64),
        vocab=50257,
        batch=32,
        block=1024,
        precision="bf16-mixed",
        compile=True,
    ),
    "default": Preset(
        lambda v, b: GPT(v, d_model=128, n_layer=3, n_head=4, block_size=b),
        vocab=66,
        batch=32,
        block=64,
        precision="32-true",
        compile=False,
        lr=4e-3,
    ),
    "lstm-medium": Preset(
        lambda v, b: RecurrentLM(v, cell="lstm", d_model=650, n_layer=2, dropout=0.5),
        vocab=10000,
        batch=20,
        block=35,
        precision="32-true",
        compile=False,
        stateful=True,
        lr=1e-3,
    ),
    "gru-medium": Preset(
        lambda v, b: RecurrentLM(v, cell="gru", d_model=650, n_layer=2, dropout=0.5),
        vocab=10000,
        batch=20,
        block=35,
        precision="32-true",
        compile=False,
        stateful=True,
        lr=1e-3,
    ),
}


def batches(p: Preset, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    seq = [torch.randint(0, p.vocab, (p.batch, p.block + 1), generator=g) for _ in range(n)]
    pin = device.type == "cuda"
    return [(s[:, :-1].pin_memory() if pin else s[:, :-1], s[:, 1:].pin_memory() if pin else s[:, 1:]) for s in seq]


def optimizer_factory(p: Preset, device: torch.device):
    return partial(torch.optim.AdamW, lr=p.lr, betas=(0.9, 0.95), weight_decay=0.1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(p: Preset, model: torch.nn.Module, data, warmup: int, device: torch.device) -> float:
    """The reference: the loop a careful engineer writes by hand. Returns seconds for the timed steps."""
    model = model.to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = optimizer_factory(p, device)(parameter_groups(model, 0.1), **fused)

    def loss_fn(x, y, state):
        logits, state = model(x, state)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), state

    loss_fn = torch.compile(loss_fn) if p.compile else loss_fn
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=p.precision.startswith("bf16"))
    state = None
    for i, (x, y) in enumerate(data):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            loss, state = loss_fn(x, y, state if p.stateful else None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state = detach_state(state)
    sync(device)
    return time.perf_counter() - start


class StepTimer(pl.Callback):
    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.seconds = warmup, device, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


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
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            if i >= self.warmup:
                self.waiting += time.perf_counter() - start
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


def lightning_loop(p: Preset, model: torch.nn.Module, data, warmup: int, device: torch.device, loader=None) -> float:
    """lmlab's path: LanguageModelTask + Trainer.fit with the default callbacks (progress bar, tokens/s)."""
    task = LanguageModelTask(
        model, optimizer=optimizer_factory(p, device), weight_decay=0.1, stateful=p.stateful, compile=p.compile
    )
    timer = StepTimer(warmup, device)
    loader = loader or torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=p.precision,
        max_steps=len(data),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[SyncFreeProgressBar(), TokenThroughput(), timer],
    )
    trainer.fit(task, train_dataloaders=loader)
    return timer.seconds


def run(
    name: str, steps: int, warmup: int, batch: int | None, compile: bool | None, repeats: int, real_data: bool = False
) -> dict:
    p = PRESETS[name]
    p = Preset(
        **{**p.__dict__, **({"batch": batch} if batch else {}), **({"compile": compile} if compile is not None else {})}
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    model = p.build(p.vocab, p.block)
    data = batches(p, warmup + steps, device)
    tokens = steps * p.batch * p.block
    times = {"plain": [], "lmlab": []}
    peak = {}
    for _ in range(repeats):  # interleaved, so drifting clocks or thermals hit both alike
        for which, loop in (("plain", plain_loop), ("lmlab", lightning_loop)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[which].append(loop(p, copy.deepcopy(model), data, warmup, device))
            if device.type == "cuda":
                peak[which] = torch.cuda.max_memory_allocated() / 2**30
    if real_data:  # the same model fed by lmlab's data module: how long does the loop wait for batches?
        timed = TimedLoader(real_data_loader(p, warmup + steps), warmup)
        seconds = lightning_loop(p, copy.deepcopy(model), data, warmup, device, loader=timed)
        real = {"real_data_tok_s": tokens / seconds, "data_wait": timed.waiting / seconds}
    best = {k: min(v) for k, v in times.items()}
    row = {
        "preset": name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "params": count_parameters(model),
        "batch": p.batch,
        "block": p.block,
        "precision": p.precision,
        "compile": p.compile,
        "plain_tok_s": tokens / best["plain"],
        "lmlab_tok_s": tokens / best["lmlab"],
        "ratio": best["plain"] / best["lmlab"],
        "ms_per_step": 1000 * best["lmlab"] / steps,
    }
    if hasattr(model, "flops_per_token") and device.type == "cuda":
        row["mfu"] = row["lmlab_tok_s"] * model.flops_per_token() / H100_BF16_PEAK
        row["plain_mfu"] = row["plain_tok_s"] * model.flops_per_token() / H100_BF16_PEAK
    if peak:
        row["peak_gib"] = peak["lmlab"]
    return {**row, **(real if real_data else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--real-data",
        action="store_true",
        help="also train on Tiny Shakespeare through lmlab's data module and report the data wait",
    )
    parser.add_argument("--name", default="throughput", help="results file: bench/results/NAME.json")
    args = parser.parse_args()
    rows = [
        run(name, args.steps, args.warmup, args.batch, args.compile, args.repeats, args.real_data)
        for name in args.preset
    ]
    columns = [
        "preset",
        "device",
        "params",
        "batch",
        "block",
        "precision",
        "compile",
        "plain_tok_s",
        "lmlab_tok_s",
        "ratio",
        "ms_per_step",
        "mfu",
        "peak_gib",
        "real_data_tok_s",
        "data_wait",
    ]
    print(table(rows, columns))
    print("written to", write_results(args.name, {"rows": rows}))


if __name__ == "__main__":
    main()
