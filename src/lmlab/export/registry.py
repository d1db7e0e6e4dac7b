"""Which transformers class each lmlab model class exports to.

Each exporter module of this package ends with its own `register_exporter(...)` line, next to the
code that maps the weights, and the modules are found by listing the package: the generic export
code never names a model family, and a new exporter is one new module here (docs/export.md).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import Tensor

from lmlab.errors import ConfigError
from lmlab.models import LanguageModel, families


@dataclass(frozen=True)
class Exporter:
    """How one lmlab model class becomes one transformers class."""

    hf_model: str  # transformers class names
    hf_config: str
    config: Callable[[Any], dict[str, Any]]
    weights: Callable[[Any], dict[str, Tensor]]


_EXPORTERS: dict[type[LanguageModel], Exporter] = {}


def register_exporter(
    model: type[LanguageModel],
    hf_model: str,
    hf_config: str,
    config: Callable[[Any], dict[str, Any]],
    weights: Callable[[Any], dict[str, Tensor]],
) -> Exporter:
    """Export instances of exactly `model` as transformers' `hf_model` (settings `hf_config`), with
    `config(model)` giving the config's keyword arguments and `weights(model)` its state dict."""
    if model in _EXPORTERS:
        raise ValueError(f"{model.__name__} has an exporter already ({_EXPORTERS[model].hf_model})")
    exporter = Exporter(hf_model, hf_config, config, weights)
    _EXPORTERS[model] = exporter
    return exporter


@functools.cache
def _import_exporter_modules() -> None:
    """Import every module of this package once, so that each one's register_exporter line has run."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{module.name}")


def exporters() -> Mapping[type[LanguageModel], Exporter]:
    """Every model class that can be exported, with its exporter."""
    _import_exporter_modules()
    return MappingProxyType(_EXPORTERS)


def exporter_for(model: LanguageModel) -> Exporter:
    """The exporter of `model`'s class, or a one-line error naming the families that can be exported."""
    exporter = exporters().get(type(model))
    if exporter is None:
        exportable = [f for f in families() if f.model in _EXPORTERS]
        choices = ", ".join(f"{f.name} (as {_EXPORTERS[f.model].hf_model})" for f in exportable)
        raise ConfigError(
            f"a {type(model).__name__} model cannot be exported to transformers: only {choices} can; "
            f"train one of those (model={'|'.join(f.name for f in exportable)}) to export it"
        )
    return exporter
