"""`LmlabLM`: lm_eval's three request types served by an lmlab checkpoint.

- `loglikelihood(context, continuation)`: the continuation's log-probability after the context.
  Attention models read the last `context_length` tokens (as lm_eval's Hugging Face model truncates;
  a continuation longer than that is scored in half-window strides);
  recurrent and state-space models read the whole context in windows of `block_size` tokens,
  carrying their state from window to window, so nothing is cut.
- `loglikelihood_rolling(text)`: the text scored exactly as evaluate.py scores a file
  (lmlab.run.evaluate.score_text under the run's evaluation protocol, or `eval_context=carry`,
  `sliding` with `eval_stride`, `full`: windows, or a state carried over the whole text; the first
  token predicted after a newline), so lm_eval's bits_per_byte equals lmlab's.
- `generate_until(context, gen_kwargs)`: lmlab's cached decoding (KV cache or carried state), greedy
  unless `do_sample`, stopped at the first `until` string.
The checkpoint is read only through lmlab's safe loader (weights_only, no code from the file).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from omegaconf import OmegaConf
from tqdm import tqdm

from lmlab.checkpoint import hash_switch, load_checkpoint, resolve_device
from lmlab.errors import ConfigError
from lmlab.generate import START_TEXT, continuation, prompt_ids, stream_tokens
from lmlab.run.evaluate import checkpoint_protocol, score_text

DEFAULT_MAX_GEN_TOKS = 256


@register_model("lmlab")
class LmlabLM(LM):
    """An lmlab checkpoint as an lm_eval model: `--model lmlab --model_args ckpt=PATH --device cpu`.

    `block_size` and `eval_batch_size` (windows scored at once by loglikelihood_rolling, which for a
    stateful run is also its number of parallel streams) default to the run's own, as evaluate.py's
    do. lm_eval's own `batch_size` and `max_batch_size` (its command line always passes a batch size)
    are accepted and unused: requests are scored one at a time. `verify_checkpoint_hash=false` skips
    checking the checkpoint's tensors against their stored hash (very large files), as in evaluate.py.
    """

    def __init__(
        self,
        ckpt: str,
        device: str | None = "auto",
        block_size: int | None = None,
        eval_batch_size: int | None = None,
        eval_context: str | None = None,
        eval_stride: int | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        verify_checkpoint_hash: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ConfigError(
                f"unknown lmlab model_args: {', '.join(sorted(kwargs))}; use ckpt, block_size, eval_batch_size, eval_context, eval_stride, "
                "verify_checkpoint_hash (and --device)"
            )
        self.loaded = load_checkpoint(ckpt, resolve_device(device or "auto"), hash_switch(verify_checkpoint_hash))
        self.model, self.tokenizer = self.loaded.model.eval(), self.loaded.tokenizer
        self._device = next(self.model.parameters()).device
        trained = self.loaded.data_config
        self.block_size = int(block_size or trained["block_size"])
        self.batch_size = int(eval_batch_size or trained.get("eval_batch_size") or trained["batch_size"])
        asked = OmegaConf.create({"eval": {"context": eval_context, "stride": eval_stride}})
        self.protocol = checkpoint_protocol(asked, self.model, trained, self.block_size)
        self.start_id = int(self.tokenizer.encode(START_TEXT)[0])

    # --- log-likelihoods ---

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).tolist() if text else []

    def _pair(self, context: str, continuation_text: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split where the joint text's ids split (BPE merges across the seam)."""
        whole = self._ids(context + continuation_text)
        n_context = len(self._ids(context))
        context_ids, continuation_ids = whole[:n_context], whole[n_context:]
        return [self.start_id, *context_ids], continuation_ids

    @torch.no_grad()
    def _continuation_logprobs(self, context_ids: list[int], continuation_ids: list[int]) -> torch.Tensor:
        """Log-probabilities [n, V] at the positions that predict the continuation's n tokens."""
        full = context_ids + continuation_ids
        if self.model.context_length is None:  # recurrent / state space: every token, window by window
            state, parts = None, []
            for start in range(0, len(full) - 1, self.block_size):
                chunk = torch.tensor([full[start : min(start + self.block_size, len(full) - 1)]], device=self._device)
                logits, state = self.model(chunk, state)
                parts.append(logits[0])
            logits = torch.cat(parts)[-len(continuation_ids) :]
        else:
            logits = self._attention_logits(full, len(continuation_ids), self.model.context_length)
        return F.log_softmax(logits.float(), dim=-1)

    def _attention_logits(self, full: list[int], n_targets: int, window: int) -> torch.Tensor:
        """Logits for the last `n_targets` tokens of `full`, each read with at most `window` tokens before it:
        one forward when they fit in the window, else half-window strides so each sees half a window or more."""
        stride = window if n_targets <= window else max(1, window // 2)
        parts, first = [], len(full) - n_targets
        for start in range(first, len(full), stride):
            end = min(start + stride, len(full))
            inputs = full[max(0, end - 1 - window) : end - 1]
            logits, _ = self.model(torch.tensor([inputs], device=self._device))
            parts.append(logits[0, -(end - start) :])
        return torch.cat(parts)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="lmlab loglikelihood"):
            context_ids, continuation_ids = self._pair(*request.args)
            if not continuation_ids:
                results.append((0.0, True))
                continue
            logprobs = self._continuation_logprobs(context_ids, continuation_ids)
            target = torch.tensor(continuation_ids, device=logprobs.device)
            total = float(logprobs.gather(1, target[:, None]).sum())
            results.append((total, bool((logprobs.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="lmlab loglikelihood_rolling"):
            (text,) = request.args
            if not self._ids(text):
                results.append(0.0)
                continue
            scores = score_text(
                self.model,
                self.tokenizer,
                text,
                block_size=self.block_size,
                batch_size=self.batch_size,
                stateful=self.protocol.carries_state,
                stride=self.protocol.stride,
            )
            results.append(-scores.loss * scores.tokens)
        return results

    # --- generation ---

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="lmlab generate_until"):
            context, gen_kwargs = request.args
            results.append(self._generate(context, dict(gen_kwargs or {})))
        return results

    @torch.no_grad()
    def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
        ids = prompt_ids(self.tokenizer, context, self.model.context_length, notify=lambda message: None)
        new: list[int] = []
        text = ""
        for token in stream_tokens(
            self.model, torch.tensor([ids], device=self._device), max_new, temperature=temperature
        ):
            new.append(int(token[0]))
            text = continuation(self.tokenizer, ids, new)
            if any(stop in text for stop in until):
                break
        for stop in until:
            text = text.split(stop)[0]
        return text
