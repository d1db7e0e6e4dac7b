"""Generation: sampling rules, cached = uncached for every model, beam search, prompts, generate.py."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.errors import ConfigError
from lmlab.generate import (
    START_TEXT,
    IncrementalDecoder,
    SamplingConfig,
    TextStream,
    beam_search,
    filter_logits,
    next_token,
    prompt_ids,
    stream_tokens,
)
from lmlab.generate.graphed import can_graph
from lmlab.models import GPT, LanguageModel, Llama, RecurrentLM, TransformerLM
from lmlab.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer
from tests.commands import run_command
from tests.helpers import MODELS, REPO

VOCAB, CONTEXT = 13, 24


def make(kind: str) -> LanguageModel:
    torch.manual_seed(0)
    if kind in ("rnn", "gru", "lstm"):
        model = RecurrentLM(VOCAB, cell=kind, d_model=16, n_layer=2, dropout=0.0)
    elif kind == "transformer":
        model = TransformerLM(VOCAB, d_model=16, n_layer=2, n_head=2, d_ff=32, dropout=0.0, block_size=CONTEXT)
    else:
        model = GPT(VOCAB, d_model=16, n_layer=2, n_head=2, dropout=0.0, block_size=CONTEXT)
    return model.eval()


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", MODELS)
def test_cached_generation_gives_the_logits_of_rereading_the_whole_prefix(kind):
    model = make(kind)
    prompt, fed = random_tokens(2, 5), random_tokens(2, CONTEXT - 5, seed=2)
    cached, uncached = IncrementalDecoder(model, prompt), IncrementalDecoder(model, prompt, cached=False)
    torch.testing.assert_close(cached.logits, uncached.logits)
    for token in fed.T:  # up to the context's last position
        torch.testing.assert_close(cached.append(token), uncached.append(token), atol=1e-5, rtol=1e-5)


def attention_model(kind: str) -> LanguageModel:
    """The attention families; Llama with grouped-query heads and rotary positions."""
    if kind == "llama":
        torch.manual_seed(0)
        return Llama(VOCAB, d_model=16, n_layer=2, n_head=4, n_kv_head=2, dropout=0.0, block_size=CONTEXT).eval()
    return make(kind)


@pytest.mark.parametrize("kind", ["transformer", "gpt", "llama"])
def test_the_fixed_shape_step_a_cuda_graph_replays_gives_the_cached_logits(kind):
    """The step GraphedStep captures (every cache position read, unwritten ones masked, the write
    position a tensor) gives the plain cached step's logits, past the context and its re-reads too.
    On a CPU it runs op by op; tests/test_cuda_graphs.py replays it as a graph on a GPU."""
    model = attention_model(kind)
    prompt, fed = random_tokens(2, 5), random_tokens(2, 2 * CONTEXT, seed=2)
    plain, fixed = IncrementalDecoder(model, prompt), IncrementalDecoder(model, prompt, cuda_graph=True)
    assert fixed.graphed is not None
    for token in fed.T:
        torch.testing.assert_close(fixed.append(token), plain.append(token), atol=1e-5, rtol=1e-5)
    assert fixed.graphed.cache.length == plain.state.length  # the same re-reads, at the same steps


def test_a_graphed_decoder_refuses_to_reorder_its_rows_and_runs_only_where_it_can():
    model = make("gpt")
    with pytest.raises(ValueError, match="cuda_graph=False"):
        IncrementalDecoder(model, random_tokens(1, 3), cuda_graph=True).reorder(torch.zeros(2, dtype=torch.long))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not can_graph(model, cpu) and can_graph(model, gpu)
    assert not can_graph(make("lstm"), gpu) and not can_graph(make("gpt").train(), gpu)


@pytest.mark.parametrize("kind", ["transformer", "gpt"])
def test_attention_models_generate_past_their_context(kind):
    model = make(kind)
    prompt = random_tokens(1, 3 * CONTEXT)  # longer than the context: its last window is kept
    out = list(stream_tokens(model, prompt, 3 * CONTEXT, temperature=0))
    assert len(out) == 3 * CONTEXT and all(0 <= int(t) < VOCAB for t in out)
    decoder = IncrementalDecoder(model, prompt)
    assert decoder.tokens.size(1) == CONTEXT


def test_filter_logits_keeps_top_k_and_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    kept = torch.isfinite(filter_logits(logits, top_p=float(probs[0] + probs[1]) - 1e-3))
    assert kept.tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).sum() == 1  # the most likely token always stays
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_sampling_is_greedy_at_zero_temperature_and_repeatable_with_a_seed():
    model = make("gpt")
    prompt = random_tokens(1, 4)
    greedy = [int(t) for t in stream_tokens(model, prompt, 10, temperature=0)]
    manual, decoder = [], IncrementalDecoder(model, prompt)
    for _ in range(10):
        manual.append(int(decoder.logits.argmax(-1)))
        decoder.append(torch.tensor([manual[-1]]))
    assert greedy == manual

    def sample(seed: int, **settings) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        new = stream_tokens(model, prompt.expand(3, -1), 12, temperature=1.5, generator=generator, **settings)
        return torch.stack(list(new), dim=1).tolist()

    assert sample(7) == sample(7) and sample(7) != sample(8)
    rows = sample(7)
    assert len({tuple(row) for row in rows}) > 1  # several samples differ from each other
    top1 = sample(3, top_k=1)
    assert all(row[:10] == greedy for row in top1)  # top_k=1 is greedy whatever the temperature


@torch.no_grad()
def continuation_log_probs(model: LanguageModel, prompt: torch.Tensor, continuations: torch.Tensor) -> torch.Tensor:
    """log P(continuation | prompt) of each row of `continuations`, in one uncached forward pass."""
    ids = torch.cat([prompt.expand(len(continuations), -1), continuations], dim=1)
    log_probs = model(ids)[0][:, prompt.size(1) - 1 : -1].log_softmax(-1)
    return log_probs.gather(-1, continuations[..., None]).squeeze(-1).sum(-1)


def test_beam_search_finds_the_most_likely_continuation():
    model = make("lstm")
    prompt, steps = random_tokens(1, 4), 3
    every = torch.tensor(list(itertools.product(range(VOCAB), repeat=steps)))
    scores = continuation_log_probs(model, prompt, every)
    beams = beam_search(model, prompt, steps, num_beams=VOCAB ** (steps - 1))  # wide enough to be exact
    assert beams[0].tokens == every[scores.argmax()].tolist()
    assert all(a.log_prob >= b.log_prob for a, b in zip(beams, beams[1:]))
    greedy = [int(t) for t in stream_tokens(model, prompt, steps, temperature=0)]
    assert beam_search(model, prompt, steps, num_beams=1)[0].tokens == greedy


def test_beam_search_scores_are_the_log_probabilities_of_its_texts():
    for kind in ("gpt", "gru"):  # a KV cache and a hidden state, both reordered as beams are dropped and copied
        model = make(kind)
        prompt = random_tokens(1, 6)
        beams = beam_search(model, prompt, 8, num_beams=4)
        assert len(beams) == 4 and len({tuple(b.tokens) for b in beams}) == 4
        recomputed = continuation_log_probs(model, prompt, torch.tensor([b.tokens for b in beams]))
        torch.testing.assert_close(torch.tensor([b.log_prob for b in beams]), recomputed, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"num_beams": 0}, "num_beams must be >= 1"),
        ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"num_beams": 2, "num_samples": 3}, "exceeds num_beams"),
        ({"cuda_graph": "yes"}, "cuda_graph must be auto, true or false"),
    ],
)
def test_meaningless_sampling_settings_are_refused(settings, message):
    with pytest.raises(ConfigError) as raised:
        SamplingConfig(**settings)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_next_token_greedy_matches_argmax():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    assert torch.equal(next_token(logits, temperature=0), logits.argmax(-1))


@pytest.fixture(scope="module")
def tokenizers():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    char, word, bpe = CharTokenizer(), WordTokenizer(min_frequency=1, unk=True), BPETokenizer(vocab_size=300)
    for tokenizer in (char, word, bpe):
        tokenizer.train(text)
    return {"char": char, "word": word, "bpe": bpe}


def test_unseen_prompt_symbols_are_named_and_mapped_to_unk(tokenizers):
    for name, prompt, unseen in (("char", "Before € we ß", ["€", "ß"]), ("word", "Before dragons speak", ["dragons"])):
        notices = []
        ids = prompt_ids(tokenizers[name], prompt, None, notices.append)
        assert len(notices) == 1 and all(repr(symbol) in notices[0] for symbol in unseen)
        assert "<unk>" in notices[0]
        assert ids.count(tokenizers[name].unk_id) == len(unseen)
    notices = []
    prompt_ids(tokenizers["bpe"], "Before € we ß", None, notices.append)
    assert notices == []  # byte-level BPE can encode anything


def test_an_empty_prompt_starts_from_a_newline_and_a_long_one_is_cropped(tokenizers):
    for tokenizer in tokenizers.values():
        assert prompt_ids(tokenizer, "", None, print) == tokenizer.encode(START_TEXT).tolist()
    notices = []
    long = "Before we proceed any further, hear me speak.\n" * 3
    ids = prompt_ids(tokenizers["char"], long, 16, notices.append)
    assert ids == tokenizers["char"].encode(long).tolist()[-16:]
    assert len(notices) == 1 and "longer than the model's context of 16" in notices[0]


def test_streamed_text_equals_decoding_everything_at_once(tokenizers):
    text = "Before we proceed, naïve 日本語 speak.\nFirst"
    for name in ("bpe", "word", "char"):
        tokenizer = tokenizers[name]
        ids = tokenizer.encode(text).tolist()
        stream = TextStream(tokenizer, ids[:2])
        pieces = [stream.push(token) for token in ids[2:]] + [stream.flush()]
        whole = tokenizer.decode(ids)
        assert "".join(pieces) == whole[len(tokenizer.decode(ids[:2])) :]
        if name == "bpe":  # multi-byte characters arrive whole, never as U+FFFD halves
            assert all("\ufffd" not in piece for piece in pieces) and "日本語" in "".join(pieces)


def _generate(*args: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "generate.py", *args], cwd=REPO, timeout=300)


def test_generate_py_streams_a_sample_and_writes_json(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    output = tmp_path / "samples.json"
    result = _generate(f"ckpt={ckpt}", "prompt=First Citizen", "max_new_tokens=30", "seed=3", f"output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("First Citizen")
    record = json.loads(output.read_text())
    assert record["samples"] == [result.stdout.rstrip("\n")]
    assert record["step"] == 20 and record["seed"] == 3
    fixed = _generate(f"ckpt={ckpt}", "prompt=First Citizen", "max_new_tokens=30", "seed=3", "cuda_graph=true")
    assert fixed.stdout == result.stdout, fixed.stderr[-2000:]  # the graph's fixed-shape step (op by op on a CPU)
    beams = tmp_path / "beams.json"
    result = _generate(f"ckpt={ckpt}", "num_beams=3", "num_samples=2", "max_new_tokens=10", f"output={beams}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("beam ") == 2 and len(json.loads(beams.read_text())["samples"]) == 2


def test_generate_py_bad_input_is_one_line(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    (tmp_path / "corrupt.ckpt").write_bytes(ckpt.read_bytes()[:1000])
    cases = [
        ([f"ckpt={tmp_path / 'missing.ckpt'}"], "does not exist"),
        ([f"ckpt={tmp_path / 'corrupt.ckpt'}"], "truncated or not a PyTorch checkpoint"),
        ([f"ckpt={ckpt}", "top_p=1.5"], "top_p must be in (0, 1]"),
        ([f"ckpt={ckpt}", "temperature=-1"], "temperature must be >= 0"),
    ]
    for args, message in cases:
        result = _generate(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert lines[0].startswith("error: ") and message in lines[0]


def test_each_validation_logs_a_sample_to_tensorboard(trained_run):
    samples = {}
    for events in trained_run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
        accumulator.Reload()
        if "val/sample/text_summary" in accumulator.Tags()["tensors"]:
            samples.update(
                {
                    event.step: event.tensor_proto.string_val[0].decode()
                    for event in accumulator.Tensors("val/sample/text_summary")
                }
            )
    assert sorted(samples) == [10, 20]  # trained 20 steps, validated every 10
    assert all(len(text.strip("`\n")) > 0 for text in samples.values())
