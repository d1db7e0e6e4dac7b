"""Generation: sampling settings, token-level decoding (sampling, beam search) and text in/out."""

from lmlab.generate.decode import Beam, IncrementalDecoder, beam_search, stream_tokens
from lmlab.generate.sampling import SamplingConfig, filter_logits, next_token
from lmlab.generate.text import START_TEXT, TextStream, continuation, generate_from_config, prompt_ids, sample_text

__all__ = [
    "START_TEXT",
    "Beam",
    "IncrementalDecoder",
    "SamplingConfig",
    "TextStream",
    "beam_search",
    "continuation",
    "filter_logits",
    "generate_from_config",
    "next_token",
    "prompt_ids",
    "sample_text",
    "stream_tokens",
]
