"""All resume policy: which checkpoint a run starts from, and with which config.

A run resumes (`ckpt_path=`), fine-tunes (`init_from=`), continues an unfinished run found in its
own directory, or starts fresh; it never writes on top of another run's results.

Resume continues the interrupted run: its config comes from the checkpoint (so the original
command line need not be repeated), changed only by what this command line sets explicitly, e.g.
`trainer.max_steps=3000`; Lightning restores weights, optimizer, scheduler, step and data position.
Fine-tuning starts a new run on new data from the checkpoint's weights: the model config and the
trained tokenizer come from the checkpoint, everything else (data, optimizer, budget) from the
command line, with a fresh optimizer and step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict

from lmlab.checkpoint.format import SECTION, is_checkpoint, load_weights, model_weights, read_checkpoint
from lmlab.errors import ConfigError
from lmlab.models import LanguageModel
from lmlab.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

LAST = "last"
# Never taken from a checkpoint: where this run writes, and what it starts from.
OWN_KEYS = ("hydra", "paths", "ckpt_path", "init_from")


def checkpoint_run_dir(ckpt_path: str | None, default: str) -> str:
    """The `hydra.run.dir` of a run: that of the run being resumed, else `default`.

    A checkpoint at `<run>/checkpoints/x.ckpt` resumes into `<run>`; `last` means the newest run
    beside `default` (under outputs/runs/) that has a `checkpoints/last.ckpt`.
    """
    if not ckpt_path:
        return default
    if ckpt_path == LAST:
        found = sorted(Path(default).parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        return str(found[-1].parent.parent) if found else default
    path = Path(ckpt_path).expanduser()
    return str(path.parent.parent) if path.parent.name == "checkpoints" else default


def command_line_overrides() -> list[Override]:
    """What this run's command line set explicitly (empty outside a Hydra run or compose)."""
    if not HydraConfig.initialized():
        return []
    return OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))


@dataclass(frozen=True)
class CheckpointStart:
    """A checkpoint this run starts from, and how."""

    path: Path
    resume: bool  # True: continue the run (Lightning restores everything); False: fine-tune its weights
    checkpoint: dict[str, Any]

    @property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.checkpoint[SECTION]["tokenizer"])

    def load_into(self, model: LanguageModel) -> None:
        """Copy the checkpoint's weights into `model` (built from the adopted config)."""
        load_weights(model, model_weights(self.checkpoint), self.path)


def start_from_checkpoint(cfg: DictConfig) -> tuple[DictConfig, CheckpointStart | None]:
    """The config this run uses and the checkpoint it starts from (None for a run from scratch)."""
    resume, init_from = cfg.get("ckpt_path"), cfg.get("init_from")
    if resume and init_from:
        raise ConfigError("ckpt_path (resume a run) and init_from (fine-tune its weights) exclude each other: set one")
    if not (resume or init_from):
        return cfg, None
    if resume == LAST:
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if not is_checkpoint(path):
            raise ConfigError(
                f"ckpt_path=last: {path} does not exist: pass hydra.run.dir=<the run directory to resume> "
                "or ckpt_path=<path of a .ckpt file>"
            )
    else:
        path = Path(resume or init_from).expanduser()
    start = CheckpointStart(path=path, resume=bool(resume), checkpoint=read_checkpoint(path))
    record, overrides = start.checkpoint[SECTION], command_line_overrides()
    _check_choices(record["config"]["names"], overrides, "ckpt_path" if resume else "init_from")
    adopted = _resume_config(cfg, record, overrides) if resume else _finetune_config(cfg, record, overrides)
    return adopted, start


def _check_choices(names: dict[str, str], overrides: list[Override], key: str) -> None:
    """The model and tokenizer come from the checkpoint: choosing others on the command line is a mistake."""
    for group in ("model", "tokenizer"):
        for override in overrides:
            if override.key_or_group == group and override.value() != names[group]:
                raise ConfigError(
                    f"{key}: the checkpoint holds a {names[group]} {group}, so {group}={override.value()} "
                    f"cannot apply: drop {group}={override.value()} (the {group} comes from the checkpoint)"
                )


def _resume_config(cfg: DictConfig, record: dict[str, Any], overrides: list[Override]) -> DictConfig:
    """The interrupted run's config, with this run's own keys and explicit command-line settings."""
    adopted = OmegaConf.create(record["resume_config"])
    with open_dict(adopted):
        for key in cfg:  # own keys, and settings lmlab gained since the checkpoint was written
            if key in OWN_KEYS or key not in adopted:
                adopted[key] = cfg[key]
        for override in overrides:
            key = override.key_or_group
            if key.split(".")[0].split("/")[0] in OWN_KEYS or key in ("model", "tokenizer"):
                continue
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(adopted, parent) if parent else adopted
                if isinstance(node, DictConfig):
                    node.pop(leaf, None)
                continue
            OmegaConf.update(adopted, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
            if key in adopted.names:  # another choice of a config group, e.g. optimizer=sgd
                adopted.names[key] = cfg.names[key]
    return adopted


def _finetune_config(cfg: DictConfig, record: dict[str, Any], overrides: list[Override]) -> DictConfig:
    model = OmegaConf.create({key: value for key, value in record["model"].items() if key != "vocab_size"})
    for override in overrides:
        if override.key_or_group.startswith("model.") and not override.is_delete():
            OmegaConf.update(
                model,
                override.key_or_group[len("model.") :],
                OmegaConf.select(cfg, override.key_or_group),
                merge=False,
                force_add=True,
            )
    adopted = cfg.copy()
    with open_dict(adopted):
        if not any(override.key_or_group == "data.block_size" for override in overrides):
            adopted.data.block_size = record["config"]["data"]["block_size"]  # the windows it was trained on
        adopted.model = model
        adopted.tokenizer = record["config"]["tokenizer"]
        adopted.names.model = record["config"]["names"]["model"]
        adopted.names.tokenizer = record["config"]["names"]["tokenizer"]
    return adopted


def finished_status(run_dir: Path) -> str | None:
    """The `status` of the run whose metrics.json is in `run_dir`, or None when it has none."""
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def continue_unfinished_run(cfg: DictConfig) -> DictConfig:
    """The config to run given the run directory's contents: never on top of another run's results.

    A directory with an unfinished run's `checkpoints/last.ckpt` (killed, interrupted, diverged) and
    no explicit `ckpt_path` resumes from it, so rerunning the same command continues the run; a
    finished run's directory, or one holding checkpoints with no last.ckpt, is refused. An explicit
    `ckpt_path` continues in its own run's directory and is left to `start_from_checkpoint`.
    """
    if cfg.get("ckpt_path"):
        return cfg
    run_dir = Path(cfg.paths.output_dir)
    if finished_status(run_dir) == "completed":
        raise ConfigError(
            f"{run_dir} already holds a finished run (metrics.json): leave hydra.run.dir unset "
            "for a new directory, or pass ckpt_path= to continue training it"
        )
    last = run_dir / "checkpoints" / "last.ckpt"  # a file, or a folder under FSDP (sharded)
    if not is_checkpoint(last):
        if any((run_dir / "checkpoints").glob("*.ckpt")):
            raise ConfigError(
                f"{run_dir} holds another run's checkpoints but no last.ckpt to resume from: "
                "pass ckpt_path=<one of them> or choose a new hydra.run.dir"
            )
        return cfg
    if cfg.get("init_from"):
        raise ConfigError(
            f"{run_dir} holds an unfinished run: fine-tune (init_from=) into a new directory, "
            "leaving hydra.run.dir unset"
        )
    log.info("%s holds an unfinished run: resuming it from %s", run_dir, last)
    resumed = cfg.copy()
    with open_dict(resumed):
        resumed.ckpt_path = str(last)
    return resumed
