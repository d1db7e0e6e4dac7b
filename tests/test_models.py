"""Every model honours the one interface: shapes, causality, caching/state, learning, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.models import GPT, KVCache, LanguageModel, RecurrentLM, TransformerLM, count_parameters, detach_state

VOCAB, BLOCK = 11, 16
KINDS = ["rnn", "gru", "lstm", "transformer", "gpt"]
RECURRENT = ["rnn", "gru", "lstm"]
ATTENTION = ["transformer", "gpt"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: thread hand-offs cost more than they save, most of all on a busy CPU."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def make(kind: str, **overrides) -> LanguageModel:
    """A tiny model of the given kind, dropout 0 unless overridden."""
    torch.manual_seed(0)
    if kind in RECURRENT:
        kwargs = dict(vocab_size=VOCAB, cell=kind, d_model=16, n_layer=2, dropout=0.0)
        return RecurrentLM(**{**kwargs, **overrides})
    if kind == "transformer":
        kwargs = dict(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, d_ff=32, dropout=0.0, block_size=BLOCK)
        return TransformerLM(**{**kwargs, **overrides})
    kwargs = dict(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, dropout=0.0, block_size=BLOCK)
    return GPT(**{**kwargs, **overrides})


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pad_vocab_to", [1, 8])
def test_output_shape_and_padding(kind: str, pad_vocab_to: int) -> None:
    model = make(kind, pad_vocab_to=pad_vocab_to)
    logits, state = model(tokens(3, 7))
    assert logits.shape == (3, 7, VOCAB)
    assert logits.dtype == torch.float32
    assert model.lm_head.weight.shape[0] == (16 if pad_vocab_to == 8 else VOCAB)
    assert model.vocab_size == VOCAB
    if kind in RECURRENT:
        assert model.context_length is None and state is not None
    else:
        assert model.context_length == BLOCK and state is None


@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind: str) -> None:
    model = make(kind).eval()
    idx = tokens(2, 12)
    with torch.no_grad():
        reference, _ = model(idx)
        for t in (0, 4, 10):
            changed = idx.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % VOCAB  # differs at every later position
            logits, _ = model(changed)
            torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(logits[:, t + 1 :], reference[:, t + 1 :])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 1, 1, 1, 1, 1], [4, 3, 1, 4], [12]])
def test_incremental_forward_matches_full(kind: str, chunks: list[int]) -> None:
    """Feeding the sequence piece by piece through the state gives the full forward's logits;
    [4, 3, ...] exercises a multi-token chunk on top of a filled cache (the explicit mask)."""
    model = make(kind).eval()
    idx = tokens(2, sum(chunks))
    with torch.no_grad():
        full, _ = model(idx)
        state, pieces, start = model.init_state(2, "cpu"), [], 0
        for n in chunks:
            logits, state = model(idx[:, start : start + n], state)
            pieces.append(logits)
            start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    if kind in ATTENTION:
        assert isinstance(state, KVCache) and state.length == start


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_loss(kind: str) -> None:
    model = make(kind).train()
    seq = torch.arange(BLOCK + 1).remainder(VOCAB).unsqueeze(0).repeat(4, 1)  # 0 1 2 ... 10 0 1 ...
    x, y = seq[:, :-1], seq[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kind", RECURRENT)
def test_recurrent_state_carries_across_batches(kind: str) -> None:
    model = make(kind).eval()
    idx = tokens(2, 10)
    with torch.no_grad():
        full, full_state = model(idx)
        first, state = model(idx[:, :6])
        second, state = model(idx[:, 6:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-6, rtol=1e-6)
    for a, b in zip(*(s if isinstance(s, tuple) else (s,) for s in (state, full_state))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", RECURRENT)
def test_detach_state_cuts_history(kind: str) -> None:
    model = make(kind)
    _, state = model(tokens(2, 5))
    parts = state if isinstance(state, tuple) else (state,)
    assert all(p.requires_grad for p in parts)
    detached = detach_state(state)
    assert type(detached) is type(state)
    parts = detached if isinstance(detached, tuple) else (detached,)
    assert all(not p.requires_grad and p.grad_fn is None for p in parts)
    assert detach_state(None) is None


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("lstm", "vocab_size", 0),
        ("gru", "d_model", 0),
        ("rnn", "n_layer", 0),
        ("lstm", "dropout", 1.0),
        ("lstm", "cell", "transformer"),
        ("lstm", "pad_vocab_to", 0),
        ("transformer", "n_head", 0),
        ("transformer", "d_ff", 0),
        ("transformer", "block_size", 0),
        ("transformer", "dropout", -0.1),
        ("gpt", "n_layer", 0),
        ("gpt", "block_size", -1),
        ("gpt", "vocab_size", 0),
    ],
)
def test_invalid_config_names_the_key(kind: str, key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{key} must be") as info:
        make(kind, **{key: value})
    assert f"model.{key}" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ATTENTION)
def test_heads_must_divide_width(kind: str) -> None:
    with pytest.raises(ValueError, match="d_model must be divisible by n_head"):
        make(kind, d_model=10, n_head=3)


def test_gpt_weight_tying_counted_once() -> None:
    model = make("gpt")
    assert model.lm_head.weight is model.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values())
    with_duplicate = sum(p.numel() for p in model.state_dict().values())  # state_dict lists both names
    assert count_parameters(model) == with_duplicate - model.wte.weight.numel()


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_optional_tying(kind: str) -> None:
    tied, untied = make(kind), make(kind, tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert count_parameters(untied) == count_parameters(tied) + tied.wte.weight.numel()


def test_transformer_positions_are_fixed() -> None:
    model = make("transformer")
    assert "pos_enc" in dict(model.named_buffers())
    assert model.pos_enc.shape == (BLOCK, 16)
    assert all("pos" not in name for name, _ in model.named_parameters())


def test_gpt_flops_per_token() -> None:
    model = make("gpt")
    n = count_parameters(model) - model.wpe.weight.numel()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 2 * 8 * BLOCK


@pytest.mark.parametrize("kind", ATTENTION)
def test_context_length_enforced(kind: str) -> None:
    model = make(kind)
    with pytest.raises(ValueError, match="context length 16"):
        model(tokens(1, BLOCK + 1))
    state = model.init_state(1, "cpu")
    with torch.no_grad():
        model(tokens(1, 10), state)
        with pytest.raises(ValueError, match="10 cached"):
            model(tokens(1, 7), state)


@pytest.mark.parametrize("kind", RECURRENT)
def test_recurrent_has_no_context_limit(kind: str) -> None:
    logits, _ = make(kind)(tokens(1, 4 * BLOCK))
    assert logits.shape == (1, 4 * BLOCK, VOCAB)
