"""Sweeps that finish themselves: rerunning a multirun command continues it.

A sweep killed at job 61 of 108 leaves 60 finished runs, one half-trained one and 47 that never
started. Rerunning the same command lands in that sweep's directory again (`unfinished_sweep`,
asked by `lmlab.run.dirs.ClaimFreshDirs`), and each job looks at its own folder first
(`continue_job`): a run completed with the same settings is reused as it is, an interrupted one
resumes from its `last.ckpt` (`lmlab.checkpoint.resume.continue_unfinished_run`), and a failed or
diverged one is set aside under `.attempts/` and trained again. The end-of-sweep report then covers
every job. A sweep whose settings changed in the meantime is never mixed with the new one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from lmlab.checkpoint.resume import finished_status
from lmlab.errors import ConfigError
from lmlab.io import atomic_write_text

log = logging.getLogger(__name__)

REQUESTED = "requested_config.yaml"  # a job's settings as asked, before planning: what a rerun compares
ATTEMPTS = ".attempts"  # failed attempts of a job, out of the report's sight (it skips hidden folders)


def settings_differences(before: Any, after: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two plain config trees."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after), key=str)
        return [
            line for key in keys for line in settings_differences(before.get(key), after.get(key), f"{prefix}{key}.")
        ]
    return [] if before == after else [f"{prefix.rstrip('.')}: {before!r} -> {after!r}"]


def unfinished_sweep(parent: Path, config: DictConfig) -> Path | None:
    """The newest sweep directory under `parent` started by the same command (same overrides and
    settings) that has not finished every job, or None. One with other settings is named and skipped."""
    asked = _sweep_identity(config)
    for sweep in sorted(parent.glob("*/multirun.yaml"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            earlier = _sweep_identity(OmegaConf.load(sweep))
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if earlier["overrides"] != asked["overrides"] or _finished(sweep.parent):
            continue
        changed = settings_differences(earlier["settings"], asked["settings"])
        if changed:
            log.warning(
                "%s was started by this command with other settings (%s): starting a new sweep",
                sweep.parent,
                "; ".join(changed[:3]),
            )
            return None
        return sweep.parent
    return None


def continue_job(cfg: DictConfig) -> dict[str, Any] | None:
    """This sweep job's earlier completed metrics when it ran with the same settings (reuse them),
    else None after making the folder ready for a run: a failed attempt set aside, an interrupted
    one left for `continue_unfinished_run` to resume."""
    run_dir = Path(cfg.paths.output_dir)
    asked = OmegaConf.to_container(cfg, resolve=True)
    record = run_dir / REQUESTED
    if record.is_file():
        changed = settings_differences(yaml.safe_load(record.read_text()), asked)
        if changed:
            raise ConfigError(
                f"sweep job {run_dir.name} ran earlier with other settings ({'; '.join(changed[:3])}): rerun the "
                "sweep's original command to continue it, or start a new sweep (leave hydra.sweep.dir unset)"
            )
        status = finished_status(run_dir)
        if status == "completed":
            log.info("%s completed earlier with the same settings: reusing its result", run_dir)
            return json.loads((run_dir / "metrics.json").read_text())
        if status is not None and status != "interrupted":  # failed or diverged: train it again from scratch
            _set_aside(run_dir)
    atomic_write_text(record, yaml.safe_dump(asked, sort_keys=True))
    return None


def _set_aside(run_dir: Path) -> None:
    attempts = run_dir / ATTEMPTS
    target = attempts / str(len(list(attempts.glob("*"))) + 1 if attempts.is_dir() else 1)
    target.mkdir(parents=True)
    for path in run_dir.iterdir():
        if path.name not in (ATTEMPTS, ".hydra", REQUESTED):
            shutil.move(str(path), target / path.name)
    log.info("%s: the failed attempt moved to %s; training it again", run_dir, target)


def _sweep_identity(config: DictConfig) -> dict[str, Any]:
    """What makes two sweeps the same: the command's overrides and every setting outside `hydra`."""
    overrides = sorted(str(o) for o in (OmegaConf.select(config, "hydra.overrides.task") or []))
    params = OmegaConf.select(config, "hydra.sweeper.params")
    settings = {key: value for key, value in OmegaConf.to_container(config, resolve=False).items() if key != "hydra"}
    settings["sweeper.params"] = OmegaConf.to_container(params) if params is not None else None
    return {"overrides": overrides, "settings": settings}


def _finished(sweep_dir: Path) -> bool:
    """A sweep whose report was written and every job of which completed."""
    if not (sweep_dir / "comparison.md").is_file():
        return False
    jobs = {p.parent for p in sweep_dir.glob("*/metrics.json")} | {p.parent for p in sweep_dir.glob("*/.hydra")}
    return all(finished_status(job) == "completed" for job in jobs)
