"""eval.context: how much context each scored token gets (window, sliding, carry, full).

The corpora are `np.arange`, so every id is its own position and a window says exactly which tokens
it covers and which it scores.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lmlab.data.eval_context import resolve_eval_protocol
from lmlab.data.windows import IGNORE_INDEX, EvalWindows, StreamBatches, shard_rows
from lmlab.errors import ConfigError
from lmlab.models import LanguageModel, Mamba
from lmlab.report import write_report
from lmlab.run.evaluate import evaluate_from_config, score_text
from lmlab.run.train import train
from lmlab.tokenizers import CharTokenizer
from tests.helpers import SHAKESPEARE, compose_config, tiny_overrides


def windows_of(dataset: EvalWindows) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.__getitems__(list(range(len(dataset))))


def materialised_windows(ids: np.ndarray, block: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-overlapping pass written out whole, as the first version of EvalWindows built it."""
    stream = np.concatenate([[context], ids]).astype(np.int64)
    n = -(-len(ids) // block)
    x, y = np.zeros(n * block, np.int64), np.full(n * block, IGNORE_INDEX, np.int64)
    x[: len(ids)], y[: len(ids)] = stream[:-1], stream[1:]
    return torch.from_numpy(x.reshape(n, block)), torch.from_numpy(y.reshape(n, block))


@pytest.mark.parametrize("n", [1, 7, 64, 100, 129])
def test_a_stride_of_one_block_is_the_plain_window_pass(n):
    ids = np.arange(1, n + 1)
    x, y = windows_of(EvalWindows(ids, 16, context_token=0, stride=16))
    ref_x, ref_y = materialised_windows(ids, 16, 0)
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    assert torch.equal(windows_of(EvalWindows(ids, 16, context_token=0))[1], ref_y)  # the default


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("stride", [1, 5, 16, 32])
def test_sliding_scores_every_token_once_with_at_least_block_minus_stride_of_context(stride, world_size):
    block, ids = 32, np.arange(1, 1 + 613)
    shares = [EvalWindows(ids, block, 0, rank=r, world_size=world_size, stride=stride) for r in range(world_size)]
    assert len({len(share) for share in shares}) == 1  # every rank runs the same number of batches
    x, y = (torch.cat(parts) for parts in zip(*(windows_of(share) for share in shares), strict=True))
    scored = y != IGNORE_INDEX
    assert y[scored].tolist() == ids.tolist()  # once each, in order
    assert (x[scored] == y[scored] - 1).all()  # each token predicted from the one before it...
    position = torch.arange(block).expand_as(y)
    assert (x[:, :1].expand_as(y)[scored] == (y - 1 - position)[scored]).all()  # ...after a contiguous window
    late = y[scored] > block  # past the first window, each target sees at least block - stride earlier tokens
    assert (position[scored][late] >= block - stride).all()


def test_windows_are_gathered_lazily_from_a_memory_map(tmp_path):
    ids = np.memmap(tmp_path / "ids.bin", dtype=np.uint16, mode="w+", shape=(5_000_000,))
    ids[:] = np.arange(len(ids)) % 60_000
    ids.flush()
    tracemalloc.start()
    windows = EvalWindows(np.memmap(tmp_path / "ids.bin", dtype=np.uint16, mode="r"), 256, 0, stride=128)
    streams = StreamBatches(np.memmap(tmp_path / "ids.bin", dtype=np.uint16, mode="r"), 16, 256, context_token=0)
    x, _ = windows.__getitems__(list(range(8)))
    streams[len(streams) - 1]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000  # a batch at a time, never the 5M-token split as int64 (40 MB)
    assert x.dtype == torch.int64 and x.shape == (8, 256)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_carried_streams_score_every_token_once_on_any_number_of_ranks(world_size):
    ids = np.arange(1, 1 + 997)
    shares = [StreamBatches(ids, 6, 8, context_token=0, rows=shard_rows(6, r, world_size)) for r in range(world_size)]
    targets = torch.cat([torch.cat([share[k][1] for k in range(len(share))], dim=1) for share in shares])
    assert sorted(targets[targets != IGNORE_INDEX].tolist()) == ids.tolist()


def test_protocols_resolve_per_family_and_bad_settings_are_refused():
    assert resolve_eval_protocol("full", None, 64, carries_state=True).label == "carry"
    assert resolve_eval_protocol("full", None, 64, carries_state=False).label == "sliding/32"
    assert resolve_eval_protocol("sliding", 16, 64, carries_state=False).label == "sliding/16"
    assert resolve_eval_protocol("window", 16, 64, carries_state=True).label == "window"
    with pytest.raises(ConfigError, match="eval.context=carry .* attention models"):
        resolve_eval_protocol("carry", None, 64, carries_state=False)
    with pytest.raises(ConfigError, match=r"eval.stride=65 must be .* below data.block_size=64"):
        resolve_eval_protocol("sliding", 65, 64, carries_state=False)
    with pytest.raises(ConfigError, match="eval.context must be one of"):
        resolve_eval_protocol("whole", None, 64, carries_state=False)


class Lag(LanguageModel):
    """Predicts token t from token t - LAG when it can see it: through its input window (attention-like),
    or through a state that remembers the last LAG tokens (a recurrent model with a fixed-size state)."""

    LAG = 200

    def __init__(self, vocab_size: int, recurrent: bool) -> None:
        super().__init__()
        self.vocab_size, self.context_length, self.recurrent = vocab_size, None, recurrent
        self.carries_state = recurrent
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, idx, state=None):
        history = state if self.recurrent and state is not None else idx.new_full((idx.size(0), 0), -1)
        seen = torch.cat([history, idx], dim=1)
        # position i predicts token i + 1, whose source is token i + 1 - LAG
        source = torch.nn.functional.pad(seen, (self.LAG, 0), value=-1)[:, -idx.size(1) - self.LAG + 1 : -self.LAG + 1]
        logits = torch.zeros(*idx.shape, self.vocab_size) + self.anchor
        known = source >= 0
        logits[known] = logits[known].scatter(-1, source[known].unsqueeze(-1), 8.0)
        return logits, (seen[:, -self.LAG :] if self.recurrent else None)

    def init_state(self, batch_size, device):
        return None


@pytest.mark.parametrize("recurrent", [False, True])
def test_full_context_sees_a_dependency_that_windows_cut(recurrent):
    """A text whose every token repeats the one 200 positions earlier: windows of 256 hide the source of
    200 of each window's targets; the full protocol (carry or sliding) hides it only at the very start."""
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghijklmnop"), 200)) * 12
    tokenizer = CharTokenizer()
    tokenizer.train(text)
    model = Lag(tokenizer.vocab_size, recurrent)
    protocol = resolve_eval_protocol("full", 32, 256, carries_state=recurrent)  # sliding: >= 224 tokens of context
    window = score_text(model, tokenizer, text, block_size=256, batch_size=4)
    full = score_text(
        model, tokenizer, text, block_size=256, batch_size=1, stateful=protocol.carries_state, stride=protocol.stride
    )
    assert full.tokens == window.tokens == len(text)
    assert full.bpb < 0.5 * window.bpb


def test_a_carried_state_scores_as_one_long_window_for_a_state_space_model():
    tokenizer = CharTokenizer()
    text = "the cat sat on the mat\n" * 12
    tokenizer.train(text)
    torch.manual_seed(0)
    model = Mamba(tokenizer.vocab_size, d_model=16, n_layer=2).eval()
    carried = score_text(model, tokenizer, text, block_size=7, batch_size=1, stateful=True)
    whole = score_text(model, tokenizer, text, block_size=len(text), batch_size=1)
    assert carried.loss == pytest.approx(whole.loss, rel=1e-5)


def test_evaluate_py_records_the_protocol_and_refuses_carry_for_attention(trained_run, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(SHAKESPEARE.read_text()[-4000:])
    ckpt = str(next((trained_run / "checkpoints").glob("best-step*.ckpt")))

    def evaluate(**eval_node):
        cfg = {"ckpt": ckpt, "data": {"path": str(text), "block_size": None, "batch_size": None}, "device": "cpu"}
        return evaluate_from_config(OmegaConf.create({**cfg, "output": str(tmp_path / "out.json"), "eval": eval_node}))

    window, sliding = evaluate(context=None), evaluate(context="sliding", stride=8)
    assert (window["eval_context"], sliding["eval_context"]) == ("window", "sliding/8")
    assert sliding["tokens"] == window["tokens"] and sliding["bpb"] != window["bpb"]
    with pytest.raises(ConfigError, match="eval.context=carry"):
        evaluate(context="carry")


@pytest.mark.slow
@pytest.mark.parametrize("model, full_context", [("lstm", "carry"), ("gpt", "sliding/16")])
def test_training_scores_with_the_protocol_asked_and_records_it(tmp_path, small_corpus, model, full_context):
    """The same model trained twice: `full` carries an LSTM's state over each split and slides GPT's
    window (stride half its block), and `also_full` adds that column to a run scored in windows."""
    once = [o for o in tiny_overrides(model, small_corpus) if "val_check_interval" not in o]
    once.append("trainer.val_check_interval=20")  # one validation, at the end: the best is the last step
    once.append("trainer.precision=32-true")  # whatever the CPU: the two scoring paths then agree to float64 sums
    window = train(compose_config([*once, "eval.also_full=true"], tmp_path / "w"))
    full = train(compose_config([*once, "eval.context=full"], tmp_path / "f"))
    assert (window["eval_context"], full["eval_context"]) == ("window", full_context)
    assert full["test/bpb"] == pytest.approx(window["test_full/bpb"], rel=1e-5)  # same weights, same protocol
    assert full["test/bpb"] != pytest.approx(window["test/bpb"], rel=1e-5)
    plan = OmegaConf.load(tmp_path / "f" / "config.yaml")
    recorded = ("carry", None) if model == "lstm" else ("sliding", 16)
    assert (plan.eval.context, plan.eval.stride) == recorded  # config.yaml records the protocol used
    assert OmegaConf.load(tmp_path / "w" / "config.yaml").eval.stride is None  # a window's length is not a stride
    with pytest.raises(ConfigError, match="these runs were scored with different eval.context protocols"):
        write_report([tmp_path / "w", tmp_path / "f"], tmp_path / "report")
    assert len(write_report([tmp_path / "w", tmp_path / "f"], tmp_path / "report", mixed_eval=True).runs) == 2


def test_carry_for_an_attention_model_is_refused_before_any_work(tmp_path, small_corpus):
    cfg = compose_config([*tiny_overrides("gpt", small_corpus), "eval.context=carry"], tmp_path / "run")
    with pytest.raises(ConfigError, match="eval.context=carry"):
        train(cfg)
    assert not (tmp_path / "cache").exists()  # refused before the corpus was prepared
