"""Self-contained checkpoints: everything needed to use a trained model, read without running code.

Every Lightning checkpoint that `train.py` writes (`last.ckpt` and the best one) carries an
`"lmlab"` section beside the weights: the format version, the resolved model config (with its
`_target_` and `vocab_size`), the trained tokenizer as its JSON string, the run's config (data,
tokenizer, optimizer, trainer settings) and the training step, all plain dicts, lists, strings and
numbers. `torch.load(..., weights_only=True)` can therefore read the whole file, and it is the only
way lmlab reads one: unpickling arbitrary objects would let a checkpoint execute code. For the same
reason the model class named by `_target_` must be a registered model family's class, looked up in
the registry without importing anything (lmlab.models.registry); nothing else is built, and a
resumed or fine-tuned run takes plain settings from a checkpoint, never a `_target_`
(lmlab.checkpoint.resume).

A file also carries `tensors_sha256`, a hash of every tensor it holds, checked on every read
(`verify_hash=False` skips it for very large files): flipped bytes are refused, not trained on.
Every command that reads a checkpoint (train.py's ckpt_path and init_from, evaluate.py, generate.py,
export.py, the harness's `lmlab` model) takes that switch as the same setting, `verify_checkpoint_hash`.
Non-finite weights are refused too. The section itself is checked before use, so a damaged one
gives one line naming what is wrong.

Under FSDP (`trainer=fsdp`) a checkpoint is a folder instead: Lightning's sharded format, each rank's
shards of the weights and optimizer state (torch.distributed.checkpoint) plus `meta.pt` with
everything else, the `"lmlab"` section included. lmlab reads such a folder as it reads a file, the
model's weights gathered from the shards in one process, so generate.py, evaluate.py and
fine-tuning need no GPU and no process group. Training resumes from it under `trainer=fsdp`.
It is not consolidated into one file at the end of training: that would gather the full weights
and optimizer state on one rank, the very memory FSDP was chosen to avoid.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import ConfigError
from lmlab.models import LanguageModel, MoEConfig
from lmlab.models.registry import model_class
from lmlab.tokenizers import Tokenizer, tokenizer_from_json

FORMAT_VERSION = 1
SECTION = "lmlab"
MODEL_PREFIX = "model."  # LanguageModelTask holds the model as `self.model`
SHARDED_META = "meta.pt"  # in a sharded checkpoint folder: all but the weights and optimizer state
HASH_KEY = "tensors_sha256"  # in the lmlab section: tensors_sha256(checkpoint) when it was written
HASH_SWITCH = "verify_checkpoint_hash"  # the setting, in every command that reads a checkpoint, that skips the check
# instantiate's keys: what builds objects. A resumed run takes none of them from a checkpoint.
BUILDER_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


def run_record(cfg: DictConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The `"lmlab"` section of every checkpoint of this run (the task adds the step when saving).

    `config` is the run's config resolved, for reading; `resume_config` keeps its interpolations,
    so a resumed run re-resolves paths where it runs. `resume_config` holds plain settings only (no `_target_` or other builder keys, no callbacks):
    a resume rebuilds every object from this lmlab's conf/ tree, with the config group `choices`.
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    resume_config = plain_settings(OmegaConf.to_container(cfg, resolve=False))
    for tree in (config, resume_config):
        tree.pop("hydra", None)
    for key in ("callbacks", "names"):
        resume_config.pop(key, None)
    return {
        "format_version": FORMAT_VERSION,
        "model": {**config["model"], "vocab_size": tokenizer.vocab_size},
        "tokenizer": tokenizer.to_json(),
        "config": config,
        "resume_config": resume_config,
        "choices": config_choices(config["names"]),
    }


def config_choices(names: dict[str, Any]) -> dict[str, str]:
    """This run's config group choices (model=gpt, trainer=fsdp, ...): all of Hydra's where it runs."""
    choices = dict(names)
    if HydraConfig.initialized():
        runtime = HydraConfig.get().runtime.choices
        choices.update({group: choice for group, choice in runtime.items() if "/" not in group and choice})
    return {group: str(choice) for group, choice in choices.items() if choice is not None}


def plain_settings(tree: Any) -> Any:
    """`tree` without builder keys (`_target_`, `_partial_`, ...) and without lists of config nodes
    (trainer.plugins): what builds objects comes from conf/, never from a checkpoint."""
    if isinstance(tree, dict):
        return {
            key: plain_settings(value)
            for key, value in tree.items()
            if key not in BUILDER_KEYS and not (isinstance(value, list) and any(isinstance(v, dict) for v in value))
        }
    return tree


def tensors_sha256(checkpoint: dict[str, Any]) -> str:
    """sha256 over every tensor of the checkpoint but the lmlab section, each with its place, dtype and
    shape, in a stable order (dict keys sorted): a flipped byte anywhere in weights or optimizer state
    changes it."""
    digest = hashlib.sha256()

    def visit(place: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{place}|{value.dtype}|{tuple(value.shape)}|".encode())
            if flat.numel():
                digest.update(flat.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(f"{place}/{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{place}/{index}", item)

    visit("", {key: value for key, value in checkpoint.items() if key != SECTION})
    return digest.hexdigest()


def hash_switch(value: Any) -> bool:
    """The `verify_checkpoint_hash` setting, which must be true or false: anything else (`off`, `no`,
    `0`) is refused in one line rather than guessed, so nobody believes the check skipped, or done,
    when it was not."""
    if not isinstance(value, bool):
        raise ConfigError(
            f"{HASH_SWITCH}={value!r} is not true or false: set {HASH_SWITCH}=true to check the checkpoint's "
            f"tensors against the hash stored when it was written, or {HASH_SWITCH}=false to skip that (very large files)"
        )
    return value


def verify_hash_setting(cfg: Mapping[str, Any]) -> bool:
    """A command's `verify_checkpoint_hash` (default true), checked by hash_switch."""
    return hash_switch(cfg.get(HASH_SWITCH, True))


def read_checkpoint(path: str | Path, verify_hash: bool = True) -> dict[str, Any]:
    """The checkpoint as plain data, or a one-line ConfigError saying why it cannot be used.

    `verify_hash=False` skips recomputing `tensors_sha256` (seconds per GB read) for very large files.
    """
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
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"checkpoint {path} is damaged: it holds no state_dict of weights; use another checkpoint")
    _check_section(section, path)
    _check_tokenizer_fits(section, path)
    if verify_hash and isinstance(section.get(HASH_KEY), str) and tensors_sha256(checkpoint) != section[HASH_KEY]:
        raise ConfigError(
            f"checkpoint {path} is damaged: its tensors no longer match the hash stored when it was written "
            "(flipped bits on disk or in transfer); use another checkpoint, e.g. last.ckpt or best-step<N>.ckpt"
        )
    _check_finite(checkpoint, path)
    return checkpoint


# Each entry of the lmlab section that lmlab reads, and the type it must have.
SECTION_TYPES = {"model": dict, "tokenizer": str, "config": dict}


def _check_section(section: dict[str, Any], path: Path) -> None:
    """A damaged section gives one line naming the entry, not a KeyError deep inside a load."""
    for key, kind in SECTION_TYPES.items():
        if not isinstance(section.get(key), kind):
            raise ConfigError(
                f"checkpoint {path} is damaged: its '{SECTION}' section lacks a valid '{key}' entry "
                f"(a {kind.__name__}); use a checkpoint written by train.py"
            )
    vocab_size = section["model"].get("vocab_size")
    if not (isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and vocab_size > 0):
        raise ConfigError(
            f"checkpoint {path} is damaged: its model config has no valid vocab_size (got {vocab_size!r}); "
            "use a checkpoint written by train.py"
        )
    step = section.get("step", 0)
    if not (isinstance(step, int) and not isinstance(step, bool)):
        raise ConfigError(
            f"checkpoint {path} is damaged: its step is {step!r}, not a number; use a checkpoint written by train.py"
        )
    if not isinstance(section["config"].get("names"), dict) or not isinstance(section["config"].get("data"), dict):
        raise ConfigError(
            f"checkpoint {path} is damaged: its run config lacks 'names' or 'data'; use a checkpoint written by train.py"
        )


def _check_finite(checkpoint: dict[str, Any], path: Path) -> None:
    """Weights with NaN or inf would train or sample nothing but NaN: refused at load."""
    for key, value in checkpoint.get("state_dict", {}).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError(
                f"checkpoint {path} holds NaN or infinite weights ({key}): it was saved from a diverged run; "
                "use an earlier checkpoint"
            )


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


def checkpoint_tokenizer(section: dict[str, Any], path: str | Path) -> Tokenizer:
    """The checkpoint's trained tokenizer, rebuilt from its JSON text (never read as a path)."""
    return tokenizer_from_json(section["tokenizer"], f"the tokenizer of checkpoint {path}")


def _check_tokenizer_fits(section: dict[str, Any], path: Path) -> None:
    """The stored tokenizer must have exactly the ids the model was trained on: another vocabulary
    would turn every id into a different symbol, or index past the embedding."""
    tokenizer_ids, model_ids = checkpoint_tokenizer(section, path).vocab_size, section["model"]["vocab_size"]
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


def checked_model_class(target: Any) -> type[LanguageModel]:
    """The registered model class a checkpoint's model `_target_` names; anything else is refused."""
    cls = model_class(target) if isinstance(target, str) else None
    if cls is None:
        raise ConfigError(
            f"model _target_ {target!r} is not an lmlab language model (a registered family's class, "
            "lmlab.models.registry): the checkpoint's model config is damaged"
        )
    return cls


def build_model(model_config: dict[str, Any]) -> LanguageModel:
    """Instantiate `model_config` (a resolved `cfg.model` plus vocab_size), allowing lmlab models only."""
    settings = MoEConfig.nest_flat_keys({key: value for key, value in model_config.items() if not key.startswith("_")})
    cls = checked_model_class(model_config.get("_target_", ""))
    try:
        return cls(**settings)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ConfigError(f"invalid model config in the checkpoint: {err}".splitlines()[0]) from None


def load_weights(model: LanguageModel, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy `weights` into `model`, or say in one line which tensors do not fit its shape."""
    own = model.state_dict()
    if not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise ConfigError(f"the weights of {source} are damaged: some entries are not tensors; use another checkpoint")
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


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", verify_hash: bool = True) -> LoadedCheckpoint:
    """Everything needed to sample from, score with or continue a trained model, from one file."""
    checkpoint = read_checkpoint(path, verify_hash)
    section = checkpoint[SECTION]
    model = build_model(section["model"])
    load_weights(model, model_weights(checkpoint), path)
    return LoadedCheckpoint(
        path=Path(path),
        model=model.to(device).eval(),
        tokenizer=checkpoint_tokenizer(section, path),
        model_config=section["model"],
        config=section["config"],
        step=int(section.get("step", checkpoint.get("global_step", 0))),
    )
