"""Every model family in one table: name -> class, default AdamW rate, tiny test shape, display order.

The facts about a family used to be repeated wherever something needed them (report ordering, the
learning-rate table, test sizes); they are written here once and read from here. What generic code
may *do* with a model is not here: each class declares it (`LanguageModel.block_types`,
`carries_state`, `supports_static_cache`), so FSDP, activation checkpointing, truncated BPTT and
graphed generation never name a family. A new family is its module, its conf/model/<name>.yaml and
one `register_family(...)` line (docs/adding-a-model.md). Registering also stores the family's config
schema, read off its constructor (schema.py), where its YAML finds it: schema/model/<name>.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from hydra.core.config_store import ConfigStore

from lmlab.models.base import LanguageModel
from lmlab.models.gpt import GPT
from lmlab.models.jamba import Jamba
from lmlab.models.llama import Llama
from lmlab.models.lstm_attn import LSTMAttentionLM
from lmlab.models.mamba import Mamba
from lmlab.models.mamba2 import Mamba2
from lmlab.models.recurrent import RecurrentLM
from lmlab.models.schema import model_schema
from lmlab.models.transformer import TransformerLM


@dataclass(frozen=True)
class Family:
    """One `model=NAME` choice.

    `settings`: the constructor arguments that make this family out of a class it shares with others
    (RecurrentLM's `cell`), as its YAML gives them. `adamw_lr`: AdamW's peak rate when
    no `task.optimizer.lr` is given. `tiny`: constructor arguments (besides vocab_size, block_size)
    for a model that trains in a few CPU seconds, for tests. `order`: where the family sits in tables
    and plots (lower first).
    """

    name: str
    model: type[LanguageModel]
    adamw_lr: float
    tiny: Mapping[str, Any]
    order: float
    settings: Mapping[str, Any] = field(default_factory=dict)

    def build_tiny(self, vocab_size: int, block_size: int = 64, **overrides: Any) -> LanguageModel:
        """The family's tiny model (`tiny`, then `overrides`), with the context given where it has one."""
        context = {"block_size": block_size} if accepts(self.model, "block_size") else {}
        return self.model(**{"vocab_size": vocab_size, **self.settings, **context, **self.tiny, **overrides})


_FAMILIES: dict[str, Family] = {}


def register_family(
    name: str,
    model: type[LanguageModel],
    adamw_lr: float,
    tiny: Mapping[str, Any],
    *,
    settings: Mapping[str, Any] | None = None,
    order: float | None = None,
) -> Family:
    """Add `name` (its conf/model/<name>.yaml builds `model`); by default it sorts after every family so far."""
    if not (isinstance(model, type) and issubclass(model, LanguageModel)):
        raise TypeError(f"family {name!r}: {model!r} is not a LanguageModel subclass")
    if name in _FAMILIES:
        raise ValueError(f"a model family named {name!r} is registered already")
    if order is None:
        order = max((f.order for f in _FAMILIES.values()), default=0) + 1
    family = Family(name, model, adamw_lr, MappingProxyType(dict(tiny)), order, MappingProxyType(dict(settings or {})))
    _FAMILIES[name] = family
    schema_name = f"{name.title().replace('_', '')}Config" if family.settings else None  # LstmConfig, GruConfig
    schema = model_schema(model, dict(family.settings), schema_name)
    ConfigStore.instance().store(group="schema/model", name=name, node=schema)
    return family


def unregister_family(name: str) -> None:
    """Remove `name` again: a family registered for one test, or by a plugin that is unloaded."""
    del _FAMILIES[name]


def families() -> list[Family]:
    """Every registered family, in display order."""
    return sorted(_FAMILIES.values(), key=lambda f: f.order)


def family(name: str) -> Family:
    if name not in _FAMILIES:
        raise KeyError(f"no model family {name!r}: the registered ones are {', '.join(family_names())}")
    return _FAMILIES[name]


def family_names() -> list[str]:
    return [f.name for f in families()]


def adamw_rates() -> dict[str, float]:
    """{family: AdamW rate}: what conf/train.yaml's `adamw_lr` and conf/optimizer/adamw.yaml read (cli.py)."""
    return {f.name: f.adamw_lr for f in families()}


def model_class(target: str) -> type[LanguageModel] | None:
    """The registered class a config's `_target_` names (its module's path, or a package's that exports
    it: lmlab.models.GPT), or None. Nothing is imported: a checkpoint's config never chooses code to run."""
    for f in families():
        module, name = f.model.__module__, f.model.__qualname__
        owners = [module] + [module.rsplit(".", depth)[0] for depth in range(1, module.count(".") + 1)]
        if any(
            target == f"{owner}.{name}" and getattr(sys.modules.get(owner), name, None) is f.model for owner in owners
        ):
            return f.model
    return None


def accepts(model: type[LanguageModel], argument: str) -> bool:
    """Whether `model`'s constructor takes `argument`."""
    return argument in inspect.signature(model).parameters


# The rates come from experiment=compare_architectures' choices on characters, checked at the default
# sizes (docs/comparisons.md: "Default rates"). The tiny shapes are the test suite's CLI shapes.
register_family("rnn", RecurrentLM, 4.0e-3, {"d_model": 32, "n_layer": 1}, settings={"cell": "rnn"})
register_family("gru", RecurrentLM, 1.2e-2, {"d_model": 32, "n_layer": 1}, settings={"cell": "gru"})
register_family("lstm", RecurrentLM, 1.2e-2, {"d_model": 32, "n_layer": 1}, settings={"cell": "lstm"})
register_family("lstm_attn", LSTMAttentionLM, 4.0e-3, {"d_model": 32, "n_layer": 1})
register_family("transformer", TransformerLM, 4.0e-3, {"d_model": 32, "n_layer": 1, "n_head": 2})
register_family("gpt", GPT, 4.0e-3, {"d_model": 32, "n_layer": 1, "n_head": 2})
register_family("llama", Llama, 4.0e-3, {"d_model": 32, "n_layer": 1, "n_head": 4, "n_kv_head": 2})
register_family("mamba", Mamba, 4.0e-3, {"d_model": 32, "n_layer": 1})
register_family("mamba2", Mamba2, 4.0e-3, {"d_model": 32, "n_layer": 1, "n_head": 2})  # the mamba rate, not tuned
# one Mamba layer, then one attention layer with a mixture-of-experts feed-forward
register_family(
    "jamba",
    Jamba,
    4.0e-3,
    {"d_model": 32, "n_layer": 2, "n_head": 2, "n_kv_head": 1, "attn_every": 2, "attn_offset": 1},
)
