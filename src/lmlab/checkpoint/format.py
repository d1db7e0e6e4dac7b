"""Self-contained checkpoints: everything needed to use a trained model, read without running code.

Every Lightning checkpoint that `train.py` writes (`last.ckpt` and the best one) carries an
`"lmlab"` section beside the weights: the format version, the resolved model config (with its
`_target_` and `vocab_size`), the trained tokenizer as its JSON string, the run's config (data,
tokenizer, optimizer, trainer settings) and the training step, all plain dicts, lists, strings and
numbers. `torch.load(..., weights_only=True)` can therefore read the whole file, and it is the only
way lmlab reads one: unpickling arbitrary objects would let a checkpoint execute code. For the same
reason the model class named by `_target_` must be a registered model family's class, looked up in
the registry without importing anything (lmlab.models.registry); nothing else is built.

Under FSDP (`trainer=fsdp`) a checkpoint is a folder instead: Lightning's sharded format, each rank's
shards of the weights and optimizer state (torch.distributed.checkpoint) plus `meta.pt` with
everything else, the `"lmlab"` section included. lmlab reads such a folder as it reads a file, the
model's weights gathered from the shards in one process, so generate.py, evaluate.py and
fine-tuning need no GPU and no process group. Training resumes from it under `trainer=fsdp`.
It is not consolidated into one file at the end of training: that would gather the full weights
and optimizer state on one rank, the very memory FSDP was chosen to avoid.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import ConfigError
from lmlab.models import LanguageModel, MoEConfig
from lmlab.models.registry import model_class
from lmlab.tokenizers import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
SECTION = "lmlab"
MODEL_PREFIX = "model."  # LanguageModelTask holds the model as `self.model`
SHARDED_META = "meta.pt"  # in a sharded checkpoint folder: all but the weights and optimizer state


def run_record(cfg: DictConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The `"lmlab"` section of every checkpoint of this run (the task adds the step when saving).

    `config` is the run's config resolved, for reading; `resume_config` keeps its interpolations
    (only the group choices in `names` are resolved), so a resumed run re-resolves paths where it runs.
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    resume_config = {**OmegaConf.to_container(cfg, resolve=False), "names": config["names"]}
    for tree in (config, resume_config):
        tree.pop("hydra", None)
    return {
        "format_version": FORMAT_VERSION,
        "model": {**config["model"], "vocab_size": tokenizer.vocab_size},
        "tokenizer": tokenizer.to_json(),
        "config": config,
        "resume_config": resume_config,
    }


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as plain data, or a one-line ConfigError saying why it cannot be used."""
    path = Path(path).expanduser()
    if not is_checkpoint(path):
        what = "is a directory but not a sharded checkpoint" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"checkpoint {path} {what}: give the path of a .ckpt file (or an FSDP run's .ckpt folder), "
            "e.g. outputs/runs/<run>/checkpoints/last.ckpt"
        )
    try:
        checkpoint = (
            _read_sharded(path) if is_sharded(path) else torch.load(path, map_location="cpu", weights_only=True)
        )
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        if zipfile.is_zipfile(path) and "Weights only load failed" in str(err):
            reason = "it holds Python objects, and lmlab only reads plain data (weights_only=True) so that loading never runs code"
        else:
            reason = "it is truncated or not a PyTorch checkpoint"
        raise ConfigError(
            f"checkpoint {path} cannot be read: {reason}; use another checkpoint, e.g. last.ckpt"
        ) from None
    section = checkpoint.get(SECTION) if isinstance(checkpoint, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(
            f"checkpoint {path} has no '{SECTION}' section: it was not written by lmlab's train.py; "
            "use a checkpoint from an lmlab run"
        )
    if section.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {path} has lmlab format version {section.get('format_version')}, this lmlab "
            f"reads version {FORMAT_VERSION}: use the lmlab version that wrote it, or retrain"
        )
    _check_tokenizer_fits(section, path)
    return checkpoint


def is_sharded(path: Path) -> bool:
    """Whether `path` is a sharded (FSDP) checkpoint folder."""
    return path.is_dir() and (path / SHARDED_META).is_file()


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint lmlab can read: a file, or a sharded checkpoint folder."""
    return path.is_file() or is_sharded(path)


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was saved at, read without loading its weights."""
    path = Path(path)
    if is_sharded(path):
        return int(torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)["global_step"])
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def _read_sharded(path: Path) -> dict[str, Any]:
    """A sharded checkpoint as a one-file checkpoint without optimizer state: `meta.pt`, plus the
    LightningModule's weights assembled from every rank's shards (plain tensors, read as weights only)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    checkpoint = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        try:
            saved = _load_state_dict_from_keys(keys={"model"}, checkpoint_id=path)
        except CheckpointException as err:  # a BaseException: a missing or damaged shard file
            raise OSError(str(err)) from None
    return {**checkpoint, "state_dict": saved["model"]}


def _check_tokenizer_fits(section: dict[str, Any], path: Path) -> None:
    """The stored tokenizer must have exactly the ids the model was trained on: another vocabulary
    would turn every id into a different symbol, or index past the embedding."""
    tokenizer_ids, model_ids = load_tokenizer(section["tokenizer"]).vocab_size, section["model"]["vocab_size"]
    if tokenizer_ids != model_ids:
        raise ConfigError(
            f"checkpoint {path} pairs a model trained on {model_ids} token ids with a tokenizer of "
            f"{tokenizer_ids}: the file was assembled from different runs; use a checkpoint written by train.py"
        )


def model_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's own state dict, out of the LightningModule's."""
    return {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }


def build_model(model_config: dict[str, Any]) -> LanguageModel:
    """Instantiate `model_config` (a resolved `cfg.model` plus vocab_size), allowing lmlab models only."""
    settings = MoEConfig.nest_flat_keys({key: value for key, value in model_config.items() if not key.startswith("_")})
    target = model_config.get("_target_", "")
    cls = model_class(target)
    if cls is None:
        raise ConfigError(
            f"model _target_ {target!r} is not an lmlab language model (a registered family's class, "
            "lmlab.models.registry): the checkpoint's model config is damaged"
        )
    try:
        return cls(**settings)
    except TypeError as err:
        raise ConfigError(f"invalid model config in the checkpoint: {err}") from None


def load_weights(model: LanguageModel, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy `weights` into `model`, or say in one line which tensors do not fit its shape."""
    own = model.state_dict()
    misfits = [
        f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}"
        for key, value in weights.items()
        if key in own and own[key].shape != value.shape
    ]
    missing = sorted(own.keys() - weights.keys())
    if misfits or missing:
        detail = misfits[0] if misfits else f"missing {missing[0]}"
        raise ConfigError(
            f"the weights of {source} do not fit the model built here ({detail}): settings that "
            "change weight shapes (d_model, n_layer, ...) must stay as in the checkpoint; drop such model.* overrides"
        )
    model.load_state_dict(weights)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A trained model ready to use (eval mode), its tokenizer and what the run was made of."""

    path: Path
    model: LanguageModel
    tokenizer: Tokenizer
    model_config: dict[str, Any]
    config: dict[str, Any]  # the training run's resolved config
    step: int

    @property
    def data_config(self) -> dict[str, Any]:
        return self.config["data"]


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; anything else is a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but this machine has no CUDA GPU: use device=cpu or device=auto")
    return device


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Everything needed to sample from, score with or continue a trained model, from one file."""
    checkpoint = read_checkpoint(path)
    section = checkpoint[SECTION]
    model = build_model(section["model"])
    load_weights(model, model_weights(checkpoint), path)
    return LoadedCheckpoint(
        path=Path(path),
        model=model.to(device).eval(),
        tokenizer=load_tokenizer(section["tokenizer"]),
        model_config=section["model"],
        config=section["config"],
        step=int(section.get("step", checkpoint.get("global_step", 0))),
    )
