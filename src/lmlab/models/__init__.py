"""Language models behind one interface: forward(idx, state) -> (logits, state), init_state(B, device)."""

from lmlab.models.attention import KVCache
from lmlab.models.base import LanguageModel, count_parameters, detach_state
from lmlab.models.gpt import GPT
from lmlab.models.recurrent import RecurrentLM
from lmlab.models.transformer import TransformerLM

__all__ = [
    "GPT",
    "KVCache",
    "LanguageModel",
    "RecurrentLM",
    "TransformerLM",
    "count_parameters",
    "detach_state",
]
