"""Which training windows generalise better on a small corpus: a fixed grid, a grid shifted each epoch, or random starts?

Trains the same char-level GPT, from the same initial weights, once per `data.sampling` mode for a
few epochs of a slice of Tiny Shakespeare, validating after every epoch, and reports each mode's
best and last validation loss (nats per character, full validation split). `fixed` is the grid
lmlab used before `data.sampling` existed (offset 0 every epoch), kept here as the baseline.

    python bench/sampling_modes.py                                   # CPU: 200 KB, 8 epochs, small GPT
    python bench/sampling_modes.py --bytes 1115394 --epochs 30 --d-model 384 --n-layer 6 --n-head 6 \
        --block-size 256 --batch-size 64 --dropout 0.2 --lr 1e-3 --accelerator gpu --name sampling_modes_gpu
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import pytorch_lightning as pl
import torch

import lmlab.data.datamodule as datamodule_module
from lmlab.data import TextDataModule
from lmlab.data.sampling import WindowSampler
from lmlab.models import GPT
from lmlab.task import LanguageModelTask
from lmlab.tokenizers import CharTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

ROOT = Path(__file__).resolve().parents[1]


class FixedGrid(WindowSampler):
    """The pre-`data.sampling` order: the same non-overlapping windows every epoch, reshuffled."""

    def epoch_starts(self) -> np.ndarray:
        return self.block_size * np.random.default_rng([self.seed, self.epoch]).permutation(self.count)


class ValidationCurve(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module has logged its scores
        self.losses.append(float(trainer.callback_metrics["val/loss"]))


def train_one(mode: str, corpus: Path, cache: Path, args: argparse.Namespace) -> dict:
    sampling = "epoch" if mode == "fixed" else mode
    data = TextDataModule(
        CharTokenizer(),
        str(corpus),
        block_size=args.block_size,
        batch_size=args.batch_size,
        sampling=sampling,
        cache_dir=str(cache),
        seed=args.seed,
    )
    data.prepare_data()
    pl.seed_everything(args.seed, verbose=False)
    model = GPT(
        data.tokenizer.vocab_size,
        d_model=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
        dropout=args.dropout,
        block_size=args.block_size,
    )
    task = LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=args.lr, betas=(0.9, 0.99)))
    curve = ValidationCurve()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision="bf16-mixed" if args.accelerator == "gpu" else "32-true",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        callbacks=[curve],
    )
    started = time.perf_counter()
    with mock.patch.object(datamodule_module, "WindowSampler", FixedGrid if mode == "fixed" else WindowSampler):
        trainer.fit(task, datamodule=data)
    best = int(np.argmin(curve.losses))
    return {
        "mode": mode,
        "best val loss": curve.losses[best],
        "best epoch": best + 1,
        "last val loss": curve.losses[-1],
        "steps": trainer.global_step,
        "seconds": time.perf_counter() - started,
        "curve": curve.losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="fixed,epoch,random")
    parser.add_argument("--bytes", type=int, default=200_000, help="the first N characters of Tiny Shakespeare")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--name", default="sampling_modes_cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sampling-"))
    corpus = work / "corpus.txt"
    corpus.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[: args.bytes])
    rows = [train_one(mode, corpus, work / "cache", args) for mode in args.modes.split(",")]
    print(table(rows, ["mode", "best val loss", "best epoch", "last val loss", "steps", "seconds"]))
    print(write_results(args.name, {"settings": vars(args), "runs": rows}))


if __name__ == "__main__":
    main()
