"""Score a nanoGPT checkpoint on exactly the text and windows lmlab validates on.

nanoGPT reports a validation loss estimated from random batches; lmlab scores every token of its
validation split once. To compare the two on identical text, this runs nanoGPT's own model code
(imported from the checkout given, never copied) over lmlab's validation split of the same corpus,
cut into lmlab's evaluation windows (lmlab.data.windows.EvalWindows), and prints nats per character.

    python bench/nanogpt_full_pass.py --nanogpt /path/to/nanoGPT --ckpt out-shakespeare-char/ckpt.pt \
        --splits 0.9 0.0999 0.0001
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from lmlab.data.corpus import split_by_bytes
from lmlab.data.windows import IGNORE_INDEX, EvalWindows

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def full_pass_nats(model: torch.nn.Module, ids: np.ndarray, context: int, block_size: int, device: str) -> float:
    """Mean nats per token over every token of `ids`, each scored once, in lmlab's windows."""
    windows = EvalWindows(ids, block_size, context_token=context)
    total, count = 0.0, 0
    for start in range(0, len(windows), 64):
        x, y = windows.x[start : start + 64].to(device), windows.y[start : start + 64].to(device)
        logits, _ = model(x, torch.where(y == IGNORE_INDEX, -1, y))  # targets given: logits at every position
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((y != IGNORE_INDEX).sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout (its model.py is imported)")
    parser.add_argument("--ckpt", type=Path, required=True, help="nanoGPT's ckpt.pt")
    parser.add_argument("--meta", type=Path, default=None, help="its meta.pkl (default: data/shakespeare_char/)")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "tinyshakespeare.txt")
    parser.add_argument("--splits", type=float, nargs=3, default=[0.9, 0.0999, 0.0001])
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args()

    sys.path.insert(0, str(args.nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's own model code

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = torch.load(args.ckpt, map_location=device, weights_only=False)  # nanoGPT's own file format
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    state = {key.removeprefix("_orig_mod."): value for key, value in checkpoint["model"].items()}
    model.load_state_dict(state)
    model.to(device).eval()
    meta = pickle.loads((args.meta or args.nanogpt / "data" / "shakespeare_char" / "meta.pkl").read_bytes())
    splits = split_by_bytes(args.corpus.read_text(encoding="utf-8"), args.splits)
    encode = meta["stoi"].__getitem__
    ids = np.array([encode(ch) for ch in splits["val"]], dtype=np.int64)
    context = encode(splits["train"][-1])
    nats = full_pass_nats(model, ids, context, checkpoint["model_args"]["block_size"], device)
    result = {
        "nanogpt_val_loss_full_pass": nats,
        "nanogpt_best_val_loss_reported": float(checkpoint.get("best_val_loss", float("nan"))),
        "iter_num": int(checkpoint.get("iter_num", -1)),
        "val_chars": len(ids),
        "splits": args.splits,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
