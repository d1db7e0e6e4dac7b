"""Config nodes to objects, with one-line errors: a bad value (a model's ValueError, a missing class) names its key."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from lmlab.errors import ConfigError, LmlabError


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` whose bad-value errors become one-line ConfigErrors naming `key`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, LmlabError):
            raise cause from None
        # ImportError: a `_target_` that does not exist, or an accelerator whose library is missing
        if isinstance(cause, (ValueError, TypeError, ImportError, MisconfigurationException)):
            raise ConfigError(f"invalid {key} config: {' '.join(str(cause).split())}") from None
        raise
