"""All resume policy: which checkpoint a run starts from, and with which config.

A run resumes (`ckpt_path=`), fine-tunes (`init_from=`), continues an unfinished run found in its
own directory, or starts fresh; it never writes on top of another run's results.

Resume continues the interrupted run: its config comes from the checkpoint (so the original
command line need not be repeated), changed only by what this command line sets explicitly, e.g.
`trainer.max_steps=3000`; Lightning restores weights, optimizer, scheduler, step and data position.
Fine-tuning starts a new run on new data from the checkpoint's weights: the model config and the
trained tokenizer come from the checkpoint, everything else (data, optimizer, budget) from the
command line, with a fresh optimizer and step.

A checkpoint is data, so it never says what to build. The config is composed anew from this lmlab's
conf/ tree with the checkpoint's config group choices (model=gpt, optimizer=sgd, trainer=fsdp: names
checked against conf/), and only then do the checkpoint's plain settings (sizes, rates, paths of
corpora) fill it in: keys conf/ has, scalars and lists of them, never a `_target_` or another key
that builds an object. Callbacks come from this command line alone.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from lmlab.checkpoint.format import (
    BUILDER_KEYS,
    SECTION,
    checked_model_class,
    checkpoint_tokenizer,
    is_checkpoint,
    is_sharded,
    load_weights,
    model_weights,
    read_checkpoint,
    verify_hash_setting,
)
from lmlab.errors import ConfigError
from lmlab.models import LanguageModel
from lmlab.repo import REPO_ROOT
from lmlab.tokenizers import Tokenizer

log = logging.getLogger(__name__)

LAST = "last"
# Never taken from a checkpoint: where this run writes, what it starts from, what it runs (callbacks),
# and what the config group choices decide (names).
OWN_KEYS = ("hydra", "paths", "ckpt_path", "init_from", "callbacks", "names")
# Config groups a resumed run takes from its checkpoint (callbacks come from the command line; a
# search's settings are not the run's), and where a group's choice lands when it is not its own name.
NOT_RESUMED_GROUPS = ("callbacks", "hparams_search")
GROUP_PACKAGES = {"optimizer": "task.optimizer", "scheduler": "task.scheduler"}
CHOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
        return checkpoint_tokenizer(self.checkpoint[SECTION], self.path)

    def load_into(self, model: LanguageModel) -> None:
        """Copy the checkpoint's weights into `model` (built from the adopted config)."""
        load_weights(model, model_weights(self.checkpoint), self.path)


def start_from_checkpoint(cfg: DictConfig) -> tuple[DictConfig, CheckpointStart | None]:
    """The config this run uses and the checkpoint it starts from (None for a run from scratch)."""
    resume, init_from = cfg.get("ckpt_path"), cfg.get("init_from")
    verify_hash = verify_hash_setting(cfg)
    if resume and init_from:
        raise ConfigError("ckpt_path (resume a run) and init_from (fine-tune its weights) exclude each other: set one")
    if not (resume or init_from):
        return cfg, None
    if resume == LAST:
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        recover_interrupted_swap(path)
        if not is_checkpoint(path):
            raise ConfigError(
                f"ckpt_path=last: {path} does not exist: pass hydra.run.dir=<the run directory to resume> "
                "or ckpt_path=<path of a .ckpt file>"
            )
    else:
        path = Path(resume or init_from).expanduser()
        recover_interrupted_swap(path)
    checkpoint = read_checkpoint(path, verify_hash)
    start = CheckpointStart(path=path, resume=bool(resume), checkpoint=checkpoint)
    record, overrides = start.checkpoint[SECTION], command_line_overrides()
    key = "ckpt_path" if resume else "init_from"
    _check_choices(record["config"]["names"], overrides, key)
    adopted = _resume_config(cfg, record, overrides, path) if resume else _finetune_config(cfg, record, overrides, path)
    return adopted, start


def _check_choices(names: dict[str, Any], overrides: list[Override], key: str) -> None:
    """The model and tokenizer come from the checkpoint: choosing others on the command line is a mistake."""
    for group in ("model", "tokenizer"):
        for override in overrides:
            if override.key_or_group == group and override.value() != names.get(group):
                raise ConfigError(
                    f"{key}: the checkpoint holds a {names.get(group)} {group}, so {group}={override.value()} "
                    f"cannot apply: drop {group}={override.value()} (the {group} comes from the checkpoint)"
                )


def _resume_config(cfg: DictConfig, record: dict[str, Any], overrides: list[Override], path: Path) -> DictConfig:
    """The interrupted run's config: conf/ composed with its group choices, its plain settings, then
    this run's own keys and explicit command-line settings."""
    stored = record.get("resume_config")
    if not isinstance(stored, dict):
        raise ConfigError(
            f"checkpoint {path} is damaged: it holds no resume_config; use a checkpoint written by train.py"
        )
    choices = record.get("choices", record["config"]["names"])
    adopted = compose_with_choices(cfg, choices, overrides, path, exclude=NOT_RESUMED_GROUPS)
    ignored: list[str] = []
    adopt_settings(adopted, stored, record["config"], _set_here(overrides, OWN_KEYS), str(path), ignored)
    if ignored:
        log.warning("not taken from %s (this config has no such keys): %s", path, ", ".join(ignored))
    return adopted


def _finetune_config(cfg: DictConfig, record: dict[str, Any], overrides: list[Override], path: Path) -> DictConfig:
    """This command line's run, with the checkpoint's model (checked as generate.py checks it) and
    tokenizer settings, and its training windows unless data.block_size is given."""
    model = {key: value for key, value in record["model"].items() if key != "vocab_size"}
    checked_model_class(model.get("_target_"))
    names = record["config"]["names"]
    adopted = compose_with_choices(cfg, {group: names.get(group) for group in ("model", "tokenizer")}, overrides, path)
    skip = _set_here(overrides, ())
    adopt_settings(adopted, {"model": model}, {"model": model}, skip, str(path), [])
    tokenizer = record["config"].get("tokenizer")
    if isinstance(tokenizer, dict):
        adopt_settings(adopted, {"tokenizer": tokenizer}, {"tokenizer": tokenizer}, skip, str(path), [])
    block_size = record["config"]["data"].get("block_size")
    if "data.block_size" not in skip:
        if not (isinstance(block_size, int) and not isinstance(block_size, bool) and block_size > 0):
            raise ConfigError(
                f"checkpoint {path} is damaged: its data.block_size is {block_size!r}; pass data.block_size=N"
            )
        with open_dict(adopted):
            adopted.data.block_size = block_size  # the windows it was trained on
    return adopted


def _set_here(overrides: list[Override], own: tuple[str, ...]) -> set[str]:
    """Config paths this run decides itself: its own keys, what its command line sets, and the
    package of each group it chooses (optimizer=sgd sets task.optimizer)."""
    paths = set(own)
    groups = set(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else set()
    for override in overrides:
        key = override.key_or_group
        paths.add(GROUP_PACKAGES.get(key, key) if key in groups else key)
    return paths


def compose_with_choices(
    cfg: DictConfig, choices: Any, overrides: list[Override], path: Path, exclude: tuple[str, ...] = ()
) -> DictConfig:
    """conf/ composed again with the checkpoint's config group `choices`, under this command line.

    Each choice must be a plain name that conf/ offers for its group: a checkpoint cannot point
    Hydra at a file of its own. Choices this command line makes itself win.
    """
    if not isinstance(choices, dict):
        raise ConfigError(f"checkpoint {path} is damaged: its config group choices are not a mapping")
    chosen_here = {override.key_or_group for override in overrides}
    with _hydra_initialized():
        loader = GlobalHydra.instance().config_loader()
        extra = []
        for group, choice in choices.items():
            if not isinstance(group, str) or "/" in group or group in exclude or group in chosen_here or choice is None:
                continue
            if not (
                isinstance(choice, str) and CHOICE_NAME.match(choice) and choice in loader.get_group_options(group)
            ):
                raise ConfigError(
                    f"checkpoint {path} chose {group}={choice!r}, which this lmlab's conf/{group}/ does not offer: "
                    f"pass {group}=<one of {', '.join(loader.get_group_options(group)) or 'none'}> on the command line"
                )
            extra.append(f"{group}={choice}")
        raw = [*(HydraConfig.get().overrides.task if HydraConfig.initialized() else []), *extra]
        try:
            composed = compose(config_name=_config_name(), overrides=raw, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as err:
            detail = " ".join(str(err).split())
            raise ConfigError(
                f"the config of checkpoint {path} cannot be composed with this lmlab's conf/: {detail}"
            ) from None
    runtime_choices = composed.hydra.runtime.choices
    with open_dict(composed):
        del composed["hydra"]
        for key in OWN_KEYS:  # where this run writes and what it starts from, as this run has them
            if key in cfg:
                composed[key] = cfg[key]
        composed.names = {key: runtime_choices.get(key) for key in cfg.names}
    return composed


def _config_name() -> str:
    return HydraConfig.get().job.config_name if HydraConfig.initialized() else "train"


@contextmanager
def _hydra_initialized() -> Iterator[None]:
    """Hydra's composer: the running app's (train.py), or one made for this run's conf/ (tests' compose())."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    sources = HydraConfig.get().runtime.config_sources if HydraConfig.initialized() else []
    folder = next((s.path for s in sources if s.provider == "main" and s.schema == "file"), None)
    if folder is None:
        folder = str(REPO_ROOT / "conf")
    with initialize_config_dir(config_dir=folder, version_base="1.3"):
        yield


def adopt_settings(
    node: DictConfig,
    stored: dict[str, Any],
    resolved: Any,
    skip: set[str],
    source: str,
    ignored: list[str],
    prefix: str = "",
) -> None:
    """Fill `node` (composed from conf/) with a checkpoint's settings `stored` (`resolved`: the same
    tree with interpolations resolved), leaving the paths in `skip` and those below them alone.

    A setting is taken only where conf/ has the same key, and only as plain data (a scalar, or a
    list of them): a key that builds an object (`_target_`, `_partial_`, ...) must equal conf/'s, an
    interpolation is taken as the value it had. Anything else is refused in one line; keys conf/
    lacks are listed in `ignored`.
    """
    current = OmegaConf.to_container(node, resolve=False)
    for key, value in stored.items():
        place = f"{prefix}{key}"
        if any(place == s or place.startswith(f"{s}.") for s in skip):
            continue
        if key not in current:
            builder = _builder_key({key: value}, prefix)
            if builder is not None:
                raise _not_plain(source, *builder, "a key that builds an object, which conf/ has not here")
            ignored.append(place)
            continue
        here = current[key]
        if value == here:
            continue
        if key in BUILDER_KEYS:
            raise _not_plain(source, place, value, f"where conf/ has {here!r}; objects come from conf/ only")
        below = resolved.get(key) if isinstance(resolved, dict) else None
        if isinstance(value, dict) and isinstance(here, dict):
            adopt_settings(node[key], value, below, skip, source, ignored, f"{place}.")
            continue
        if isinstance(value, dict) and _is_plain_mapping(value):  # e.g. a table conf/ now computes (adamw_lr)
            with open_dict(node):
                node[key] = value
            continue
        if isinstance(value, dict) or isinstance(here, dict):
            raise _not_plain(source, place, value, "where conf/ has a different kind of entry")
        if _has_interpolation(value):
            value = below
        if not _is_plain(value) or _has_interpolation(value):
            raise _not_plain(source, place, value, "which is not a plain setting (a scalar or a list of them)")
        with open_dict(node):
            node[key] = value


def _builder_key(tree: Any, prefix: str) -> tuple[str, Any] | None:
    """The first (place, value) of a key that builds an object anywhere in `tree`, else None."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if key in BUILDER_KEYS:
            return f"{prefix}{key}", value
        found = _builder_key(value, f"{prefix}{key}.")
        if found is not None:
            return found
    return None


def _not_plain(source: str, place: str, value: Any, why: str) -> ConfigError:
    if isinstance(value, dict):
        shown = " to a config node"
    elif isinstance(value, (list, tuple)) and not _is_plain(value):
        shown = " to a list of config nodes"
    else:
        shown = f"={value!r}" if len(repr(value)) <= 80 else f"={repr(value)[:77]}..."
    return ConfigError(
        f"checkpoint {source} sets {place}{shown} {why}: a checkpoint may only carry plain settings; "
        "use a checkpoint written by train.py, or pass the original run's config groups (e.g. trainer=fsdp) on the command line"
    )


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _is_plain_mapping(value: dict) -> bool:
    """A table of plain settings: string keys, none that builds an object, no interpolation anywhere."""
    return all(
        isinstance(key, str)
        and key not in BUILDER_KEYS
        and (_is_plain_mapping(item) if isinstance(item, dict) else _is_plain(item) and not _has_interpolation(item))
        for key, item in value.items()
    )


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_has_interpolation(item) for item in value)
    return isinstance(value, str) and "${" in value


def recover_interrupted_swap(path: Path) -> bool:
    """Put back a sharded (FSDP) checkpoint whose swap was killed between its two renames.

    AtomicFSDPStrategy saves into `<name>.saving/`, renames `<name>` to `<name>.old`, then
    `.saving` to `<name>`. Killed in between, both states are whole but `<name>` is missing: the
    newer one (`.saving`, complete once it holds meta.pt and the shards' index) is renamed into
    place, else the older. Returns whether one was.
    """
    if path.exists():
        return False
    for candidate in (path.with_name(path.name + ".saving"), path.with_name(path.name + ".old")):
        if is_sharded(candidate) and (candidate / ".metadata").is_file():
            candidate.rename(path)
            log.warning("%s was missing after an interrupted save: restored it from %s", path, candidate.name)
            return True
    return False


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
    recover_interrupted_swap(last)
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
