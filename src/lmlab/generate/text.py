"""From a prompt string to generated text: prompt checks, streaming decode, and `generate.py`'s work.

`lmlab.generate.decode` works on token ids; this module adds the tokenizer. An empty prompt starts from
a newline: none of lmlab's tokenizers has a beginning-of-text token that training text contains
(BPE's `<|endoftext|>` never occurs in it), while a newline starts every line the model has read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import Tensor

from lmlab.checkpoint import load_checkpoint, resolve_device, verify_hash_setting
from lmlab.errors import ConfigError
from lmlab.generate.decode import beam_search, stream_tokens
from lmlab.generate.sampling import SamplingConfig
from lmlab.io import atomic_write_json
from lmlab.models import LanguageModel
from lmlab.tokenizers import Tokenizer

START_TEXT = "\n"
UNFINISHED = "\ufffd"  # what a decoder shows for the first bytes of a character still to come

Notify = Callable[[str], None]


def prompt_ids(tokenizer: Tokenizer, prompt: str, context_length: int | None, notify: Notify) -> list[int]:
    """The ids generation starts from, with a notice for anything the model cannot see as given:
    symbols the tokenizer never saw (they become <unk>) and tokens beyond the model's context."""
    if unknown := tokenizer.unknown_symbols(prompt):
        shown = ", ".join(repr(symbol) for symbol in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        notify(
            f"warning: the prompt has {len(unknown)} symbol(s) the {tokenizer.name} tokenizer never saw in training: "
            f"{shown}; each was mapped to <unk>"
        )
    ids = tokenizer.encode(prompt).tolist() if prompt else tokenizer.encode(START_TEXT).tolist()
    if context_length is not None and len(ids) > context_length:
        notify(
            f"notice: the prompt is {len(ids)} tokens, longer than the model's context of {context_length}: "
            f"generating from its last {context_length} tokens"
        )
        ids = ids[-context_length:]
    return ids


class TextStream:
    """Ids in, text out, piece by piece: each piece is what decoding every id so far adds.

    Decoding the whole sequence (not each id alone) keeps word spacing and multi-byte characters
    right; a piece ending in an unfinished character waits for the ids that complete it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt: list[int]) -> None:
        self.tokenizer, self.ids = tokenizer, list(prompt)
        self.shown = len(tokenizer.decode(self.ids))
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._take(final=False)

    def flush(self) -> str:
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        decoded = self.tokenizer.decode(self.ids)
        if decoded.endswith(UNFINISHED) and not final:
            return ""
        piece, self.shown = decoded[self.shown :], len(decoded)
        self.text += piece
        return piece


def continuation(tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text `new` adds after `prompt`."""
    stream = TextStream(tokenizer, prompt)
    for token in new:
        stream.push(token)
    stream.flush()
    return stream.text


def _sampled(model: LanguageModel, prompt: Tensor, sampling: SamplingConfig) -> Iterator[Tensor]:
    """The tokens `sampling` draws after `prompt` [B, T], one [B] step at a time, from a generator
    seeded with sampling.seed: the same settings give the same text in training and in generate.py."""
    generator = torch.Generator(device=prompt.device).manual_seed(sampling.seed)
    return stream_tokens(
        model,
        prompt,
        sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        generator=generator,
        cuda_graph=None if sampling.cuda_graph == "auto" else sampling.cuda_graph,
    )


def sample_text(model: LanguageModel, tokenizer: Tokenizer, sampling: SamplingConfig) -> str:
    """The prompt and a seeded sample after it: what training shows at each validation and at the end."""
    ids = prompt_ids(tokenizer, sampling.prompt, model.context_length, notify=lambda message: None)
    was_training = model.training
    model.eval()
    new = _sampled(model, torch.tensor([ids], device=next(model.parameters()).device), sampling)
    text = continuation(tokenizer, ids, [int(token) for token in new])
    model.train(was_training)
    return sampling.prompt + text


def _samples(
    model: LanguageModel, ids: list[int], settings: SamplingConfig, device: torch.device
) -> Iterator[list[int]]:
    """The new tokens of each sample (or beam, best first)."""
    prompt = torch.tensor([ids], device=device)
    if settings.num_beams > 1:
        beams = beam_search(model, prompt, settings.max_new_tokens, settings.num_beams)
        yield from (beam.tokens for beam in beams[: settings.num_samples])
        return
    new = list(_sampled(model, prompt.expand(settings.num_samples, -1), settings))
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(settings.num_samples)]
    yield from rows


def generate_from_config(cfg: DictConfig) -> list[str]:
    """`generate.py`: load the checkpoint, sample, print (streaming a single sample), write JSON if asked."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError(
            "ckpt is not set: pass ckpt=PATH of a checkpoint, e.g. outputs/runs/<run>/checkpoints/last.ckpt"
        )
    settings = SamplingConfig.from_config(cfg)
    out = Console(highlight=False, soft_wrap=True)
    notices = Console(stderr=True, highlight=False, soft_wrap=True)
    device = resolve_device(cfg.device)
    loaded = load_checkpoint(cfg.ckpt, device, verify_hash_setting(cfg))
    prompt = settings.prompt
    ids = prompt_ids(
        loaded.tokenizer, prompt, loaded.model.context_length, notify=lambda m: notices.print(m, markup=False)
    )
    streaming = settings.num_samples == 1 and settings.num_beams == 1
    if streaming:
        texts = [_stream_one(loaded.model, loaded.tokenizer, ids, prompt, settings, device, out)]
    else:
        texts = [
            continuation(loaded.tokenizer, ids, tokens) for tokens in _samples(loaded.model, ids, settings, device)
        ]
        for number, text in enumerate(texts, 1):
            label = "beam" if settings.num_beams > 1 else "sample"
            out.rule(f"{label} {number}")
            out.print(prompt + text, markup=False)
    if cfg.get("output"):
        atomic_write_json(cfg.output, _record(cfg, loaded.step, prompt, texts, settings))
        notices.print(f"wrote {cfg.output}", markup=False)
    return texts


def _stream_one(
    model: LanguageModel,
    tokenizer: Tokenizer,
    ids: list[int],
    prompt: str,
    settings: SamplingConfig,
    device: torch.device,
    out: Console,
) -> str:
    """Print the prompt, then each piece of text as soon as its token is chosen."""
    stream, write = TextStream(tokenizer, ids), out.file.write
    write(prompt)
    for token in _sampled(model, torch.tensor([ids], device=device), settings):
        write(stream.push(int(token)))
        out.file.flush()
    write(stream.flush() + "\n")
    return stream.text


def _record(cfg: DictConfig, step: int, prompt: str, texts: list[str], settings: SamplingConfig) -> dict[str, Any]:
    return {
        "checkpoint": str(cfg.ckpt),
        "step": step,
        "prompt": prompt,
        **{key: value for key, value in vars(settings).items() if key != "prompt"},
        "samples": [prompt + text for text in texts],
        "continuations": texts,
    }
