"""Scoring any text with a trained model: loss, perplexity and bits per byte as training defines them.

The text is tokenized with the checkpoint's own tokenizer and cut into windows exactly as a
validation split is (`EvalWindows`, or `StreamBatches` for a stateful recurrent run), so every
token is scored once and bits per byte = total nats / ln 2 / UTF-8 bytes of the text, the
definition `LanguageModelTask` uses. The first token is predicted after a newline, generation's
documented start, since the text has no preceding token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch.utils.data import DataLoader

from lmlab.checkpoint import load_checkpoint, resolve_device, verify_hash_setting
from lmlab.data.eval_context import EvalProtocol, resolve_eval_protocol
from lmlab.data.sources import read_local_corpus
from lmlab.data.windows import EvalWindows, StreamBatches, already_batched
from lmlab.errors import ConfigError
from lmlab.generate import START_TEXT
from lmlab.io import atomic_write_json
from lmlab.metrics import bits_per_byte, token_nats
from lmlab.models import LanguageModel
from lmlab.report.terminal import scores_table
from lmlab.tokenizers import Tokenizer


@dataclass(frozen=True)
class Scores:
    loss: float  # nats per token
    ppl: float
    bpb: float
    tokens: int
    bytes: int
    unk_rate: float | None  # None for a tokenizer that has no <unk> (byte-level BPE)


@torch.no_grad()
def score_text(
    model: LanguageModel,
    tokenizer: Tokenizer,
    text: str,
    *,
    block_size: int,
    batch_size: int,
    stateful: bool = False,
    stride: int | None = None,
    context_token: int | None = None,
) -> Scores:
    """Score every token of `text`; `context_token` is what its first token is predicted from.
    `stateful`: `batch_size` streams, each carrying its state; else windows of `block_size` whose
    last `stride` targets are scored (default: all of them, the non-overlapping pass)."""
    ids = tokenizer.encode(text)
    if len(ids) == 0:
        raise ConfigError("the text to evaluate has no tokens: give data.path a file with text in it")
    if model.context_length is not None and block_size > model.context_length:
        raise ConfigError(
            f"data.block_size={block_size} is longer than the model's context ({model.context_length}): "
            f"set data.block_size to {model.context_length} or less"
        )
    context = int(tokenizer.encode(START_TEXT)[0]) if context_token is None else context_token
    total = total_nats(
        model, ids, context, block_size=block_size, batch_size=batch_size, stateful=stateful, stride=stride
    )
    n_bytes = len(text.encode("utf-8"))
    unk = None if tokenizer.unk_id is None else int((ids == tokenizer.unk_id).sum()) / len(ids)
    return Scores(
        loss=total / len(ids),
        ppl=math.exp(total / len(ids)),
        bpb=bits_per_byte(total, n_bytes),
        tokens=len(ids),
        bytes=n_bytes,
        unk_rate=unk,
    )


@torch.no_grad()
def total_nats(
    model: LanguageModel,
    ids: np.ndarray,
    context_token: int,
    *,
    block_size: int,
    batch_size: int,
    stateful: bool = False,
    stride: int | None = None,
) -> float:
    """The summed nats of every token of `ids`, each scored once: in `batch_size` streams carrying
    the state (`stateful`), else in windows of `block_size` scoring their last `stride` targets."""
    windows = (
        StreamBatches(ids, batch_size, block_size, context_token=context_token)
        if stateful
        else EvalWindows(ids, block_size, context_token=context_token, stride=stride)
    )
    loader = (
        DataLoader(windows, batch_size=None)
        if stateful
        else DataLoader(windows, batch_size=batch_size, collate_fn=already_batched)
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, state = torch.zeros((), dtype=torch.float64, device=device), None
    for x, y in loader:
        logits, new_state = model(x.to(device), state)
        state = new_state if stateful else None
        nats += token_nats(logits, y.to(device)).double()
    model.train(was_training)
    return float(nats)


def default_output(ckpt: str | Path, data_path: str | Path) -> Path:
    """`<run dir>/eval-<text name>.json` beside the run's metrics.json for a checkpoint in
    `<run dir>/checkpoints/`, else beside the checkpoint."""
    folder = Path(ckpt).expanduser().resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / f"eval-{Path(data_path).stem}.json"


def evaluate_from_config(cfg: DictConfig) -> dict[str, Any]:
    """`evaluate.py`: score the file, print a table, write the scores as JSON; returns them."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError(
            "ckpt is not set: pass ckpt=PATH of a checkpoint, e.g. outputs/runs/<run>/checkpoints/last.ckpt"
        )
    if OmegaConf.is_missing(cfg.data, "path"):
        raise ConfigError("data.path is not set: pass data.path=FILE (or a folder of text files) to score")
    loaded = load_checkpoint(cfg.ckpt, resolve_device(cfg.device), verify_hash_setting(cfg))
    trained = loaded.data_config
    block_size = int(cfg.data.block_size or trained["block_size"])
    batch_size = int(cfg.data.batch_size or trained.get("eval_batch_size") or trained["batch_size"])
    for key, value in (("block_size", block_size), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"data.{key} must be >= 1 (got {value})")
    text = read_local_corpus(cfg.data.path)
    protocol = checkpoint_protocol(cfg, loaded.model, trained, block_size)
    scores = score_text(
        loaded.model,
        loaded.tokenizer,
        text,
        block_size=block_size,
        batch_size=batch_size,
        stateful=protocol.carries_state,
        stride=protocol.stride,
    )
    result = {
        "checkpoint": str(cfg.ckpt),
        "step": loaded.step,
        "data": str(cfg.data.path),
        "model": loaded.config["names"]["model"],
        "tokenizer": loaded.tokenizer.name,
        "block_size": block_size,
        "stateful": protocol.carries_state,
        "eval_context": protocol.label,
        **asdict(scores),
    }
    output = Path(cfg.output) if cfg.get("output") else default_output(cfg.ckpt, cfg.data.path)
    atomic_write_json(output, result)
    _print_table(result, output, Console())
    return result


def checkpoint_protocol(cfg: DictConfig, model: LanguageModel, trained: dict, block_size: int) -> EvalProtocol:
    """`eval.context` as asked, or by default the protocol the run itself was scored with."""
    asked = cfg.get("eval") or {}
    context = asked.get("context") or trained.get("eval_context") or ("carry" if trained["stateful"] else "window")
    context = context.split("/")[0]  # a recorded `sliding/64` names its stride too
    stride = asked.get("stride") or trained.get("eval_stride")
    return resolve_eval_protocol(context, stride, block_size, type(model).carries_state)


def _print_table(result: dict[str, Any], output: Path, console: Console) -> None:
    title = f"{result['model']} · {result['tokenizer']} · step {result['step']}"
    console.print(scores_table(title, {str(result["data"]): result}))
    console.print(
        f"{result['tokens']:,} tokens · {result['bytes']:,} bytes · wrote {output}", highlight=False, markup=False
    )
