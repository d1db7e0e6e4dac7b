"""Language models behind one interface: forward(idx, state) -> (logits, state), init_state(B, device)."""

from lmlab.models.base import LanguageModel, count_parameters
from lmlab.models.gpt import GPT
from lmlab.models.jamba import Jamba
from lmlab.models.llama import Llama
from lmlab.models.lstm_attn import LSTMAttentionLM
from lmlab.models.mamba import Mamba
from lmlab.models.mamba2 import Mamba2
from lmlab.models.moe_config import MoEConfig
from lmlab.models.recurrent import RecurrentLM
from lmlab.models.registry import Family, families, family, family_names, register_family, unregister_family
from lmlab.models.state import (
    HybridCache,
    KVCache,
    MemoryState,
    SSMCache,
    State,
    detach_state,
    select_state,
    state_from_data,
    state_to_data,
)
from lmlab.models.transformer import TransformerLM

__all__ = [
    "GPT",
    "Family",
    "HybridCache",
    "Jamba",
    "KVCache",
    "LSTMAttentionLM",
    "LanguageModel",
    "Llama",
    "Mamba",
    "Mamba2",
    "MemoryState",
    "MoEConfig",
    "RecurrentLM",
    "SSMCache",
    "State",
    "TransformerLM",
    "count_parameters",
    "detach_state",
    "families",
    "family",
    "family_names",
    "register_family",
    "select_state",
    "state_from_data",
    "state_to_data",
    "unregister_family",
]
