"""What every entry point shares: the config resolvers, and one way to end a user error.

`register_resolvers()` is called explicitly by each entry point (and by tests that compose configs)
before Hydra composes; a user error (`LmlabError`, which includes a model's ValueError turned into a
ConfigError by `lmlab.run.build`) ends in one `error:` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

from lmlab.checkpoint.resume import checkpoint_run_dir
from lmlab.errors import USER_ERROR_EXIT, LmlabError
from lmlab.models.registry import adamw_rates, family_names
from lmlab.repo import REPO_ROOT
from lmlab.run.dirs import JOB_DIR_RESOLVER, RESOLVER, claimed_dir, job_dir_name

T = TypeVar("T")
DEFAULT_ADAMW_LR = 4.0e-3  # a model config without a registry line


def adamw_lr(family: str | None = None) -> DictConfig | float:
    """The `lmlab_adamw_lr` resolver: a model family's default AdamW rate (conf/optimizer/adamw.yaml), or
    without a name the table of every registered family's (conf/train.yaml's `adamw_lr`, which runs record)."""
    rates = adamw_rates()
    return OmegaConf.create(rates) if family is None else rates.get(family, DEFAULT_ADAMW_LR)


def register_resolvers() -> None:
    """The `${lmlab_*:}` resolvers conf/ uses; registering twice is harmless."""
    resolvers = {
        # configs name bundled files (data/tinyshakespeare.txt) whatever the working directory
        "lmlab_root": lambda: str(REPO_ROOT),
        # default run and sweep directories, made unique by lmlab.run.dirs.ClaimFreshDirs
        RESOLVER: claimed_dir,
        # a sweep job's folder: short, safe and unique, whatever its overrides
        JOB_DIR_RESOLVER: job_dir_name,
        # a resumed run (ckpt_path=<run>/checkpoints/x.ckpt) writes on into <run>
        "lmlab_run_dir": checkpoint_run_dir,
        # a model family's default AdamW rate, or the table of them (lmlab.models.registry)
        "lmlab_adamw_lr": adamw_lr,
        # every registered family, comma-separated: the sweeps over all architectures
        "lmlab_families": lambda: ",".join(family_names()),
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def user_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Run `main`; a user error ends in one `error:` line and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except LmlabError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)

    return wrapper
