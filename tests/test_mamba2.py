"""Mamba-2: the chunked SSD equals its recurrence, the model's state carries exactly, it trains, and bad
head/group/chunk settings fail in one line naming the key."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import Jamba, Mamba2, SSMCache, select_state
from lmlab.models.ssd import ssd_chunked, ssd_step
from lmlab.run.train import train
from tests.helpers import compose_config, tiny_overrides

VOCAB = 40


def make(**kw) -> Mamba2:
    torch.manual_seed(0)
    sizes = dict(d_model=32, n_layer=2, d_state=8, d_conv=3, n_head=4, n_groups=2, chunk_size=4)
    return Mamba2(VOCAB, **{**sizes, **kw})


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def recurrence(x, a, b, c, state):
    """The SSM one step at a time: the definition the chunked form must reproduce."""
    ys = []
    for t in range(x.size(1)):
        y, state = ssd_step(x[:, t], a[:, t], b[:, t], c[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("length, chunk", [(13, 4), (7, 8), (17, 16), (1, 4), (32, 8)])
@pytest.mark.parametrize("start", ["zeros", "given"])
def test_chunked_ssd_equals_the_recurrence(length, chunk, start):
    g = torch.Generator().manual_seed(length)
    batch, heads, head_dim, groups, d_state = 2, 4, 3, 2, 5
    x = torch.randn(batch, length, heads, head_dim, generator=g)
    a = -torch.rand(batch, length, heads, generator=g)  # log decays, as dt x A
    b, c = (torch.randn(batch, length, groups, d_state, generator=g) for _ in range(2))
    state = torch.randn(batch, heads, head_dim, d_state, generator=g) if start == "given" else None

    y, final = ssd_chunked(x, a, b, c, chunk, state)
    y_ref, final_ref = recurrence(x, a, b, c, torch.zeros(batch, heads, head_dim, d_state) if state is None else state)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_ref, atol=1e-5, rtol=1e-5)


def test_groups_share_b_and_c_among_their_heads():
    """With 2 groups of 2 heads, heads 0-1 read group 0's B and C and heads 2-3 group 1's."""
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(1, 6, 4, 3, generator=g), -torch.rand(1, 6, 4, generator=g)
    b, c = torch.randn(1, 6, 2, 5, generator=g), torch.randn(1, 6, 2, 5, generator=g)
    y, _ = ssd_chunked(x, a, b, c, 4)
    for head in range(4):
        group = head // 2
        alone, _ = ssd_chunked(
            x[:, :, head : head + 1],
            a[:, :, head : head + 1],
            b[:, :, group : group + 1],
            c[:, :, group : group + 1],
            4,
        )
        torch.testing.assert_close(y[:, :, head : head + 1], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_one_token_steps_equal_the_full_forward():
    model = make().eval()
    idx = tokens(2, 11)
    full, _ = model(idx)
    state, steps = model.init_state(2, "cpu"), []
    for t in range(idx.size(1)):
        logits, state = model(idx[:, t : t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert isinstance(state, SSMCache)
    assert state.conv.shape == (2, 2, 64 + 2 * 2 * 8, 2)  # layers, batch, x|B|C channels, d_conv - 1
    assert state.ssm.shape == (2, 2, 4, 16, 8)  # layers, batch, heads, head_dim, d_state: whatever the length


@torch.no_grad()
def test_state_carried_across_two_halves_equals_one_pass():
    model = make().eval()
    idx = tokens(3, 21)  # neither half a multiple of the chunk size
    full, full_state = model(idx)
    first, state = model(idx[:, :9])
    second, state = model(idx[:, 9:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.ssm, full_state.ssm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.conv, full_state.conv)


@torch.no_grad()
def test_beam_search_can_select_state_rows():
    model = make().eval()
    idx = tokens(3, 6)
    _, state = model(idx)
    picked = select_state(state, torch.tensor([2, 0]))
    next_token = tokens(2, 1, seed=5)
    expected, _ = model(torch.cat([idx[[2, 0]], next_token], dim=1))
    logits, _ = model(next_token, picked)
    torch.testing.assert_close(logits[:, -1], expected[:, -1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_causal():
    model = make().eval()
    idx = tokens(1, 12)
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % VOCAB
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


@torch.no_grad()
@pytest.mark.parametrize("how", ["bf16 weights", "bf16 autocast"])
def test_bf16_runs_close_to_fp32(how):
    model = make().eval()
    idx = tokens(2, 11)
    reference, _ = model(idx)
    if how == "bf16 weights":  # as generation casts a model: no autocast, the weights themselves in bf16
        logits, state = model.to(torch.bfloat16)(idx, model.init_state(2, "cpu"))
        logits, state = model(idx[:, :1], state)  # and a one-token step from the carried state
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, _ = model(idx)
        torch.testing.assert_close(logits.float(), reference, atol=0.15, rtol=0.05)
    assert torch.isfinite(logits).all()


def test_activation_checkpointing_keeps_loss_and_gradients():
    idx = tokens(2, 10)
    results = []
    for checkpointing in (False, True):
        model = make().train()
        model.activation_checkpointing = checkpointing
        logits, _ = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


def test_flops_count_the_ssd_beyond_the_weights():
    model = make()
    mixer = model.blocks[0].mixer
    per_layer = 2 * 4 * (2 * 8 + 64) + 4 * 64 * 8  # 2 Q (G N + d_inner) + 4 d_inner N, Q = chunk_size
    assert mixer.mixing_flops(64) == per_layer
    assert mixer.mixing_flops(2) == 2 * 2 * (2 * 8 + 64) + 4 * 64 * 8  # a sequence shorter than a chunk
    assert model.flops_per_token(64) == 6 * model.matmul_parameters() + 3 * 2 * per_layer


@torch.no_grad()
def test_jamba_takes_mamba2_as_its_state_space_layer():
    torch.manual_seed(0)
    sizes = dict(d_model=32, n_layer=2, n_head=2, n_kv_head=1, attn_every=2, attn_offset=1, d_state=8, block_size=16)
    model = Jamba(VOCAB, ssm="mamba2", ssm_n_head=4, chunk_size=4, **sizes).eval()
    assert type(model.layers[0].mixer).__name__ == "Mamba2Mixer"
    idx = tokens(2, 9)
    full, _ = model(idx)
    state, steps = model.init_state(2, "cpu"), []
    for t in range(idx.size(1)):
        logits, state = model(idx[:, t : t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    default = Jamba(VOCAB, **sizes)
    assert type(default.layers[0].mixer).__name__ == "MambaMixer"  # ssm=mamba stays the default


def test_loss_falls_through_train_py(tmp_path, small_corpus):
    cfg = compose_config(tiny_overrides("mamba2", small_corpus, steps=20), tmp_path / "run")
    metrics = train(cfg)
    assert metrics["model"] == "mamba2"
    with open(tmp_path / "run" / "curve.csv") as f:
        losses = [float(row["val/loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 2 and losses[1] < losses[0] < math.log(metrics["vocab_size"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_head=3", "n_head must divide d_inner = expand x d_model = 64 (got n_head=3): set model.n_head"),
        ("model.n_groups=3", "n_groups must divide n_head=2 (got n_groups=3): "),
        ("model.chunk_size=48", "chunk_size must be a power of two (got 48): set model.chunk_size"),
        ("model.chunk_size=0", "chunk_size must be >= 1 (got 0)"),
    ],
)
def test_bad_settings_fail_in_one_line_naming_the_key(tmp_path, small_corpus, override, message):
    cfg = compose_config(tiny_overrides("mamba2", small_corpus) + [override], tmp_path / "run")
    with pytest.raises(ConfigError) as caught:
        train(cfg)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_jamba_names_its_ssm_head_key():
    with pytest.raises(
        ValueError, match="ssm_n_head must divide d_inner = expand x d_model = 64 .*set model.ssm_n_head"
    ):
        Jamba(VOCAB, d_model=32, n_layer=2, n_head=2, attn_every=2, attn_offset=1, ssm="mamba2", ssm_n_head=3)
    with pytest.raises(ValueError, match="ssm must be one of mamba, mamba2"):
        Jamba(VOCAB, d_model=32, n_layer=2, n_head=2, attn_every=2, attn_offset=1, ssm="s4")
