"""A family's config schema, read off its constructor: the signature is where its defaults are written.

Each `model=NAME` node is this dataclass (registered in Hydra's ConfigStore as schema/model/NAME by
the registry) under the few lines of conf/model/NAME.yaml, so every constructor argument is a config
key at the class's default, typed: a misspelt key or a value of the wrong type is refused when the
config is composed, naming the key, before anything is built. Values a type hint cannot carry
(callables, tuples) are left untyped; nested settings dataclasses (MoEConfig) become nested nodes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import Any

from omegaconf import MISSING

PLAIN = (int, float, str, bool)
# Every schema made here, by name: a config holding one pickles it by reference (lmlab.models.schema.
# schemas.NAME), as a sweep launcher that hands results between processes must.
schemas = types.SimpleNamespace()


def _named(cls: type, name: str) -> type:
    cls.__name__, cls.__qualname__, cls.__module__ = name, f"schemas.{name}", __name__
    setattr(schemas, name, cls)
    return cls


def _node_type(annotation: Any) -> Any:
    """The OmegaConf type of one argument: a plain scalar (optional where None is allowed), a settings
    dataclass, or Any."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        dataclass_options = [a for a in options if dataclasses.is_dataclass(a)]
        if dataclass_options:
            return dataclass_options[0]
        if len(options) == 1 and options[0] in PLAIN:
            return typing.Optional[options[0]]  # noqa: UP045  (OmegaConf reads typing.Optional, not X | None)
        return Any
    return annotation if annotation in PLAIN or dataclasses.is_dataclass(annotation) else Any


@functools.cache
def _mutable(settings: type) -> type:
    """A settings dataclass as an editable node (a frozen one would make its keys read-only overrides)."""
    hints = typing.get_type_hints(settings)
    fields = [
        (f.name, _node_type(hints[f.name]), dataclasses.field(default=f.default)) for f in dataclasses.fields(settings)
    ]
    return _named(dataclasses.make_dataclass(settings.__name__, fields), settings.__name__)


def model_schema(model: type, settings: dict[str, Any] | None = None, name: str | None = None) -> type:
    """A dataclass with `_target_` and one field per constructor argument (but vocab_size, set once the
    tokenizer is trained), at the class's default or the family's own `settings` (RecurrentLM's cell),
    named `name` (default: the class's name + "Config"; families sharing a class need their own)."""
    hints = typing.get_type_hints(model.__init__)
    fields: list[tuple[str, Any, dataclasses.Field]] = [("_target_", str, dataclasses.field(default=MISSING))]
    for parameter in inspect.signature(model).parameters.values():
        if parameter.name == "vocab_size" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        node = _node_type(hints.get(parameter.name, Any))
        default = (settings or {}).get(parameter.name, parameter.default)
        if dataclasses.is_dataclass(node):
            values = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}
            node = _mutable(node)
            field = dataclasses.field(default_factory=functools.partial(node, **values))
        else:
            field = dataclasses.field(default=MISSING if default is parameter.empty else default)
        fields.append((parameter.name, node, field))
    name = name or f"{model.__name__}Config"
    return _named(dataclasses.make_dataclass(name, fields), name)
