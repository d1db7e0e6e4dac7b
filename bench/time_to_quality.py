"""Time to quality on CPU: lmlab's default `python train.py` beside nanoGPT's CPU recipe, one benchmark run.

Both run their real command lines in subprocesses, start-up included, one after the other on the
same machine, and both are then scored by this script on identical text: every character of the
last 10% of Tiny Shakespeare (nanoGPT's val.bin: `text[int(0.9 n):]`), each predicted once, in
non-overlapping windows of the context length, the first from the character before the cut
(lmlab's `score_text` for lmlab; the same windows through nanoGPT's own model for nanoGPT). Each
is scored on the weights it ends with (lmlab's last.ckpt, nanoGPT's ckpt.pt). lmlab's own
validation curve (its 90-95% split, from TensorBoard) and peak resident memory are kept too.

    python bench/time_to_quality.py                                   # lmlab's default run only
    python bench/time_to_quality.py --nanogpt ../shared/anchors/nanoGPT
    python bench/time_to_quality.py --nanogpt PATH -- trainer.max_steps=2000   # lmlab overrides

nanoGPT is not a dependency: its checkout is copied to a temporary folder, its data prepared
there from data/tinyshakespeare.txt (its prepare.py, offline), and its train.py run unmodified
with `--nanogpt-args` (default: the retuned CPU recipe of ../shared/anchors/README.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

from lmlab.checkpoint import load_checkpoint
from lmlab.data.windows import IGNORE_INDEX, EvalWindows, already_batched
from lmlab.run.evaluate import score_text

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
NANOGPT_CPU = (
    "config/train_shakespeare_char.py --device=cpu --compile=False --block_size=64 --batch_size=32 --n_layer=3 "
    "--n_head=4 --n_embd=128 --max_iters=1400 --lr_decay_iters=1400 --dropout=0.0 --learning_rate=4e-3 "
    "--min_lr=4e-4 --warmup_iters=30 --eval_interval=1400 --eval_iters=20 --always_save_checkpoint=True"
)


def scored_text() -> tuple[str, str]:
    """The last 10% of the corpus as nanoGPT's prepare.py cuts it, and the character before it."""
    text = CORPUS.read_text()
    cut = int(len(text) * 0.9)
    return text[cut:], text[cut - 1]


def run_lmlab(overrides: list[str]) -> dict:
    """`python train.py OVERRIDES` end to end; its wall time, metrics, curve and last checkpoint."""
    run_dir = Path(tempfile.mkdtemp(prefix="ttq-lmlab-"))
    command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - started
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    curve = [{"wall_s": e.wall_time - started, "step": e.step, "val_loss": e.value} for e in events.Scalars("val/loss")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    loaded = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    text, before = scored_text()
    block = int(loaded.model_config.get("block_size") or 64)
    context = int(loaded.tokenizer.encode(before)[0])
    scores = score_text(loaded.model, loaded.tokenizer, text, block_size=block, batch_size=64, context_token=context)
    return {
        "system": "lmlab",
        "command": " ".join(["python train.py", *overrides]),
        "wall_s": wall,
        "steps": metrics["steps"],
        "last10_loss": scores.loss,
        "own_val_loss": metrics["val/loss"],
        "curve": curve,
    }


def run_nanogpt(checkout: Path, args: str) -> dict:
    """nanoGPT's train.py end to end from a temporary copy, its data prepared offline first (not timed)."""
    work = Path(tempfile.mkdtemp(prefix="ttq-nanogpt-")) / "nanoGPT"
    shutil.copytree(checkout, work, ignore=shutil.ignore_patterns("*.bin", "*.pt", "__pycache__"))
    data = work / "data" / "shakespeare_char"
    shutil.copy(CORPUS, data / "input.txt")
    prepare = (data / "prepare.py").read_text().replace("import requests", "# import requests (offline)")
    subprocess.run([sys.executable, "-"], input=prepare, cwd=data, text=True, check=True, stdout=subprocess.DEVNULL)
    out_dir = work / "out-ttq"
    command = [sys.executable, "train.py", *shlex.split(args), f"--out_dir={out_dir}"]
    started = time.time()
    subprocess.run(command, cwd=work, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - started
    return {
        "system": "nanoGPT",
        "command": " ".join(["python train.py", args]),
        "wall_s": wall,
        **score_nanogpt(work, out_dir / "ckpt.pt", data / "meta.pkl"),
    }


@torch.no_grad()
def score_nanogpt(work: Path, ckpt_path: Path, meta_path: Path) -> dict:
    """The same windows as lmlab's score_text, through nanoGPT's own model class and character ids."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", work / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = module.GPT(module.GPTConfig(**checkpoint["model_args"]))
    state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    model.load_state_dict(state)
    model.eval()
    stoi = pickle.loads(meta_path.read_bytes())["stoi"]
    text, before = scored_text()
    ids = np.array([stoi[c] for c in text], dtype=np.int64)
    windows = EvalWindows(ids, checkpoint["model_args"]["block_size"], context_token=stoi[before])
    nats = 0.0
    for x, y in DataLoader(windows, batch_size=64, collate_fn=already_batched):
        logits, _ = model(x, torch.zeros_like(x))  # with targets, nanoGPT returns every position's logits
        nats += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return {"steps": checkpoint["iter_num"], "last10_loss": float(nats) / len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, default=None, help="a nanoGPT checkout: run its CPU recipe too")
    parser.add_argument("--nanogpt-args", default=NANOGPT_CPU, help="nanoGPT train.py arguments")
    parser.add_argument("--margin", type=float, default=0.05, help="nats/char lmlab must be below nanoGPT")
    parser.add_argument("--name", default="time_to_quality")
    parser.add_argument("overrides", nargs="*", help="lmlab train.py overrides (after --)")
    args = parser.parse_args()

    runs = []
    if args.nanogpt is not None:  # first, so lmlab's run is never the one that warmed the machine
        runs.append(run_nanogpt(args.nanogpt, args.nanogpt_args))
    runs.append(run_lmlab(args.overrides))
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lmlab = runs[-1]
    print(table(lmlab["curve"], ["wall_s", "step", "val_loss"]))
    print(table(runs, ["system", "wall_s", "steps", "last10_loss", "own_val_loss"]))
    summary = {"peak_rss_mib_any_child": peak_rss_mib}
    if args.nanogpt is not None:
        reference = runs[0]
        summary |= {
            "loss_below_nanogpt": reference["last10_loss"] - lmlab["last10_loss"],
            "wall_ratio": lmlab["wall_s"] / reference["wall_s"],
            "met": reference["last10_loss"] - lmlab["last10_loss"] >= args.margin
            and lmlab["wall_s"] <= reference["wall_s"],
        }
        print(
            f"lmlab {summary['loss_below_nanogpt']:+.3f} nats/char below nanoGPT on the same text, "
            f"in {summary['wall_ratio']:.2f}x its wall time: target {'met' if summary['met'] else 'not met'}"
        )
    print("written to", write_results(args.name, {"summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
