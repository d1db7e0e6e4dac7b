"""What tells the runs of a sweep apart: the settings it sweeps, not the ones every run shares.

A sweep's run names in TensorBoard, MLflow and W&B, its job folders and the report's `run` column
all follow one rule: a run is labelled by its overrides of the keys the sweep varies (`model=gpt,
tokenizer=bpe`), while settings given once for all runs (`data.path=...`, `budget.max_bytes=...`)
stay out of the name. The swept keys are those of the sweep's command line that list several values
(Hydra's basic sweeper records that command line in `<sweep dir>/multirun.yaml` before any job
starts) and those of `hydra.sweeper.params` (an experiment's grids, Optuna's search space).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf


def _key(override: Any) -> str:
    """`model`, `task.optimizer.lr`, `model@x`: the key an override sets, without `+`/`~`."""
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def _command_line(hydra: DictConfig) -> list[Any] | None:
    """The sweep's command-line overrides, parsed, as Hydra recorded them; None without a record."""
    try:
        recorded = yaml.safe_load((Path(str(hydra.sweep.dir)) / "multirun.yaml").read_text())
        command_line = recorded["hydra"]["overrides"]["task"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return OverridesParser.create().parse_overrides([str(o) for o in command_line or []])


def swept_keys(hydra: DictConfig) -> set[str]:
    """The keys a sweep varies, from its recorded command line and `hydra.sweeper.params`."""
    return _swept(hydra, _command_line(hydra))


def _swept(hydra: DictConfig, command_line: list[Any] | None) -> set[str]:
    keys = {str(key) for key in (OmegaConf.select(hydra, "sweeper.params") or {})}
    return keys if command_line is None else keys | {_key(o) for o in command_line if o.is_sweep_override()}


def varying_overrides(hydra: DictConfig) -> str | None:
    """This job's overrides of the swept keys, sorted and comma-joined as Hydra's `override_dirname`
    (and without its `exclude_keys`); None when nothing says what the sweep varies."""
    kept = _varying(hydra)
    return None if kept is None else ",".join(str(o.input_line) for o in kept)


def _varying(hydra: DictConfig) -> list[Any] | None:
    """The job's overrides that tell it apart, sorted: those of swept keys, and those its sweeper added
    beyond the command line (a learning rate past the grid's edge, `sweep.extend_grid`), but not the
    settings the command line gives every job once, nor Hydra's `exclude_keys`. None when nothing says
    what the sweep varies."""
    command_line = _command_line(hydra)
    swept = _swept(hydra, command_line)
    if not swept:
        return None
    shared = None if command_line is None else {_key(o) for o in command_line if not o.is_sweep_override()}
    excluded = set(OmegaConf.select(hydra, "job.config.override_dirname.exclude_keys") or [])

    def tells_apart(key: str) -> bool:
        return key not in excluded and (key in swept or (shared is not None and key not in shared))

    parsed = OverridesParser.create().parse_overrides([str(o) for o in hydra.overrides.task])
    return sorted((o for o in parsed if tells_apart(_key(o))), key=lambda o: str(o.input_line))


def varying_values(hydra: DictConfig) -> str | None:
    """The values alone (`gpt bpe` for `model=gpt,tokenizer=bpe`), in the order of varying_overrides:
    a label short enough for a narrow column (TensorBoard's HParams Trial ID)."""
    kept = _varying(hydra)
    return None if kept is None else " ".join(str(o.value()) for o in kept) or None
