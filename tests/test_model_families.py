"""The newer families (Llama, LSTM + attention, Mamba, Jamba, mixtures of experts) honour the one
interface: shapes, causality, carried state, cached generation, the scan, the auxiliary loss, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmlab.models import (
    GPT,
    HybridCache,
    Jamba,
    KVCache,
    LanguageModel,
    Llama,
    LSTMAttentionLM,
    Mamba,
    MemoryState,
    RecurrentLM,
    SSMCache,
    count_parameters,
    detach_state,
    select_state,
    state_from_data,
    state_to_data,
)
from lmlab.models.mamba import cuda_selective_scan
from lmlab.models.moe import MoE
from lmlab.models.rope import apply_rope
from lmlab.models.scan import parallel_scan, resolve_scan, selective_scan, sequential_scan

VOCAB, BLOCK = 11, 16
CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
MAMBA = dict(d_state=4, d_conv=3, expand=2)
FAMILIES = {
    "llama": lambda **kw: Llama(
        **{**dict(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=4, n_kv_head=2, block_size=BLOCK), **kw}
    ),
    "llama_moe": lambda **kw: Llama(
        **{**dict(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, block_size=BLOCK, n_experts=4, top_k=2), **kw}
    ),
    "gpt_moe": lambda **kw: GPT(
        **{**dict(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, block_size=BLOCK, n_experts=3, top_k=1), **kw}
    ),
    "lstm_attn": lambda **kw: LSTMAttentionLM(
        **{**dict(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, window=4, dropout=0.0), **kw}
    ),
    "mamba": lambda **kw: Mamba(**{**dict(vocab_size=VOCAB, d_model=16, n_layer=2, **MAMBA), **kw}),
    "jamba": lambda **kw: Jamba(
        **{
            **dict(vocab_size=VOCAB, d_model=16, n_layer=4, n_head=2, n_kv_head=1, attn_every=2, attn_offset=1),
            **dict(block_size=BLOCK, n_experts=4, top_k=2, moe_every=2, **MAMBA),
            **kw,
        }
    ),
}
KINDS = list(FAMILIES)
MOE = ["llama_moe", "gpt_moe", "jamba"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: thread hand-offs cost more than they save, most of all on a busy CPU."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def make(kind: str, **overrides) -> LanguageModel:
    torch.manual_seed(0)
    return FAMILIES[kind](**overrides)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pad_vocab_to", [1, 8])
def test_output_shape_and_padding(kind: str, pad_vocab_to: int) -> None:
    model = make(kind, pad_vocab_to=pad_vocab_to)
    logits, _ = model(tokens(3, 7))
    assert logits.shape == (3, 7, VOCAB) and logits.dtype == torch.float32
    assert model.lm_head.weight.shape[0] == (16 if pad_vocab_to == 8 else VOCAB)


@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind: str) -> None:
    """Changing a token never changes the logits before it, and does change some after it."""
    model = make(kind).eval()
    idx = tokens(2, 12)
    with torch.no_grad():
        reference, _ = model(idx)
        for t in (0, 5, 10):
            changed = idx.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % VOCAB
            logits, _ = model(changed)
            torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(logits[:, t + 1 :], reference[:, t + 1 :])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunks", [[7, 5], [1] * 12, [4, 3, 1, 4]])
def test_chunked_forward_matches_full(kind: str, chunks: list[int]) -> None:
    """A sequence fed in pieces through the carried state gives the full forward's logits."""
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


@pytest.mark.parametrize("kind", ["lstm_attn", "mamba"])
def test_recurrent_families_carry_state_from_none(kind: str) -> None:
    """Truncated BPTT starts from state=None and carries what comes back, as with RecurrentLM."""
    model = make(kind).eval()
    idx = tokens(2, 10)
    with torch.no_grad():
        full, _ = model(idx)
        first, state = model(idx[:, :6])
        second, _ = model(idx[:, 6:], detach_state(state))
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_matches_uncached(kind: str) -> None:
    """Greedy generation one token at a time through the state gives the logits of re-running the prefix."""
    model = make(kind).eval()
    seq = tokens(2, 4)
    with torch.no_grad():
        logits, state = model(seq, model.init_state(2, "cpu"))
        cached = [logits[:, -1]]
        for _ in range(BLOCK - 4):
            seq = torch.cat([seq, cached[-1].argmax(-1, keepdim=True)], dim=1)
            logits, state = model(seq[:, -1:], state)
            cached.append(logits[:, -1])
        uncached = [model(seq[:, :n])[0][:, -1] for n in range(4, BLOCK + 1)]
    torch.testing.assert_close(torch.stack(cached), torch.stack(uncached), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_select_state_follows_reordered_rows(kind: str) -> None:
    """Beam search keeps rows [2, 0, 0] of a state: continuing from it equals running those rows afresh."""
    model = make(kind).eval()
    prompt, nxt = tokens(3, 5), tokens(3, 2, seed=2)
    index = torch.tensor([2, 0, 0])
    with torch.no_grad():
        _, state = model(prompt, model.init_state(3, "cpu"))
        reordered, _ = model(nxt, select_state(state, index))
        fresh, _ = model(torch.cat([prompt[index], nxt], dim=1), model.init_state(3, "cpu"))
    torch.testing.assert_close(reordered, fresh[:, 5:], atol=1e-5, rtol=1e-5)


def test_select_state_picks_the_rows_of_every_tensor() -> None:
    """Each container moves every one of its tensors along: row r of each holds the value r."""

    def rows(*shape: int, batch_dim: int = 1) -> torch.Tensor:
        view = [1] * len(shape)
        view[batch_dim] = shape[batch_dim]
        return torch.arange(shape[batch_dim], dtype=torch.float32).view(view).expand(shape).clone()

    kv = KVCache(2, 3, 2, 4, 8)
    kv.k, kv.v, kv.length = rows(2, 3, 2, 8, 4), rows(2, 3, 2, 8, 4), 5
    ssm = SSMCache(rows(2, 3, 4, 2), rows(2, 3, 4, 5))
    memory = MemoryState((rows(2, 3, 4), rows(2, 3, 4)), rows(3, 2, 5, 4, batch_dim=0), rows(3, 2, 5, 4, batch_dim=0))
    index = torch.tensor([2, 0, 0])
    for state in (kv, ssm, HybridCache(kv, ssm), memory, (rows(2, 3, 4), rows(2, 3, 4))):
        picked = select_state(state, index)
        flat = [picked.kv, picked.ssm] if isinstance(picked, HybridCache) else [picked]
        tensors = []
        for part in flat:
            if isinstance(part, tuple):
                tensors += list(part)
            elif isinstance(part, MemoryState):
                tensors += [*part.hidden, part.keys.transpose(0, 1), part.values.transpose(0, 1)]
            else:
                tensors += [t for t in vars(part).values() if isinstance(t, torch.Tensor)]
        assert len(tensors) >= 2
        for t in tensors:
            assert torch.equal(t.select(1, 0).unique(), torch.tensor([2.0])), type(part).__name__
            assert torch.equal(t.select(1, 2).unique(), torch.tensor([0.0]))
    assert select_state(kv, index).length == 5


def test_states_have_their_types_and_detach() -> None:
    states = {kind: make(kind)(tokens(2, 5), make(kind).init_state(2, "cpu"))[1] for kind in KINDS}
    assert isinstance(states["llama"], KVCache) and states["llama"].k.shape[2] == 2  # n_kv_head heads cached
    assert isinstance(states["jamba"], HybridCache) and states["jamba"].kv.length == 5
    assert isinstance(states["mamba"], SSMCache) and isinstance(states["lstm_attn"], MemoryState)
    for kind in ("mamba", "lstm_attn"):
        state = states[kind]
        detached = detach_state(state)
        assert type(detached) is type(state)
        assert any(t.requires_grad for t in vars(state).values() if isinstance(t, torch.Tensor))
        assert not any(t.requires_grad for t in vars(detached).values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("kind", KINDS)
def test_states_survive_a_plain_data_checkpoint(kind: str, tmp_path: Path) -> None:
    """A carried state written as plain data reloads with weights_only=True and continues identically."""
    model = make(kind).eval()
    idx = tokens(2, 9)
    with torch.no_grad():
        _, state = model(idx[:, :5], model.init_state(2, "cpu"))
        torch.save({"carried_state": state_to_data(state)}, tmp_path / "state.pt")
        loaded = state_from_data(torch.load(tmp_path / "state.pt", weights_only=True)["carried_state"])
        assert type(loaded) is type(state)
        expected, _ = model(idx[:, 5:], select_state(state, torch.arange(2)))
        resumed, _ = model(idx[:, 5:], loaded)
    torch.testing.assert_close(resumed, expected, atol=0, rtol=0)


def test_recurrent_states_stay_a_fixed_size() -> None:
    """Mamba's state and LSTM-attention's memory do not grow with the text read."""
    mamba, lstm_attn = make("mamba").eval(), make("lstm_attn", window=3).eval()
    with torch.no_grad():
        short, long = mamba(tokens(1, 3))[1], mamba(tokens(1, 40))[1]
        memory = lstm_attn(tokens(1, 40))[1]
    assert short.conv.shape == long.conv.shape == (2, 1, 32, 2) and short.ssm.shape == long.ssm.shape == (2, 1, 32, 4)
    assert memory.keys.shape == memory.values.shape == (1, 2, 3, 8)


@pytest.mark.parametrize("kind", ["llama", "mamba", "lstm_attn", "jamba"])
def test_training_lowers_loss(kind: str) -> None:
    model = make(kind).train()
    seq = torch.arange(BLOCK + 1).remainder(VOCAB).unsqueeze(0).repeat(4, 1)
    x, y = seq[:, :-1], seq[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- the selective scan ---------------------------------------------------------------------------


def scan_inputs(batch: int = 2, length: int = 33, d: int = 5, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u, z = torch.randn(batch, length, d, generator=g), torch.randn(batch, length, d, generator=g)
    dt = F.softplus(torch.randn(batch, length, d, generator=g))
    A = -torch.rand(d, n, generator=g) * 3 - 0.1
    B, C = torch.randn(batch, length, n, generator=g), torch.randn(batch, length, n, generator=g)
    D, h0 = torch.randn(d, generator=g), torch.randn(batch, d, n, generator=g)
    return [t.requires_grad_() for t in (u, dt, A, B, C, D, z, h0)]


@pytest.mark.parametrize("length", [1, 2, 33, 64])
def test_parallel_scan_equals_sequential_forward_and_gradients(length: int) -> None:
    """To 1e-5 in fp32, odd lengths (identity padding) and a starting state included."""
    results = {}
    for method in ("parallel", "sequential"):
        inputs = scan_inputs(length=length)
        y, h = selective_scan(*inputs, method=method)
        g = torch.Generator().manual_seed(1)
        (y * torch.randn(y.shape, generator=g)).sum().add((h * torch.randn(h.shape, generator=g)).sum()).backward()
        results[method] = [y, h, *(t.grad for t in inputs)]
    for parallel, sequential in zip(results["parallel"], results["sequential"]):
        torch.testing.assert_close(parallel, sequential, atol=1e-5, rtol=1e-5)


def test_auto_scan_is_sequential_on_a_cpu_and_parallel_on_a_gpu() -> None:
    assert resolve_scan("auto", torch.device("cpu")) == "sequential"
    assert resolve_scan("auto", torch.device("cuda")) == "parallel"
    assert resolve_scan("parallel", torch.device("cpu")) == "parallel"
    y_auto, _ = selective_scan(*scan_inputs(length=9), method="auto")
    y_sequential, _ = selective_scan(*scan_inputs(length=9), method="sequential")
    assert torch.equal(y_auto, y_sequential)


def test_the_sequential_reference_backward_grows_linearly_with_length() -> None:
    """Indexing a[:, t] per step made each step's backward write a full-size gradient: 19 s instead of
    0.14 s at 1,024 steps. Counted, not timed: the autograd nodes one step adds stay constant."""

    def nodes(length: int) -> int:
        a = torch.rand(1, length, 2, requires_grad=True)
        out = sequential_scan(a, torch.rand(1, length, 2))
        seen, stack = set(), [out.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in seen:
                seen.add(node)
                stack.extend(next_fn for next_fn, _ in node.next_functions)
        return sum(type(n).__name__ == "SelectBackward0" for n in seen)

    assert nodes(8) == nodes(64) == 0  # one UnbindBackward, never a full-size select gradient per step


def test_parallel_scan_is_the_recurrence() -> None:
    """Against a hand-unrolled h_t = a_t h_{t-1} + b_t."""
    a = torch.tensor([[0.5, 2.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0]])
    expected = torch.tensor([[1.0, 3.0, 6.0]])  # 1; 2*1 + 1; 1*3 + 3
    torch.testing.assert_close(parallel_scan(a, b), expected)
    torch.testing.assert_close(sequential_scan(a, b), expected)


@pytest.mark.parametrize("recompute_scan", [True, False])
def test_mamba_scans_agree_through_the_model(recompute_scan: bool) -> None:
    """Same weights: the parallel scan (stored or recomputed for the backward) gives the sequential
    reference's loss and every parameter's gradient."""
    parallel = make("mamba", scan="parallel", recompute_scan=recompute_scan)
    sequential = make("mamba", scan="sequential", recompute_scan=False)
    idx = tokens(2, 20)
    losses = [m(idx)[0].logsumexp(-1).mean() for m in (parallel, sequential)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for p, s in zip(parallel.parameters(), sequential.parameters()):
        torch.testing.assert_close(p.grad, s.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_selective_scan() is None, reason="needs a GPU and the mamba-ssm package"
)
def test_mamba_cuda_kernel_matches_torch() -> None:
    torch.manual_seed(0)
    torch_model = Mamba(VOCAB, d_model=64, n_layer=2, kernels="torch").cuda()
    cuda_model = Mamba(VOCAB, d_model=64, n_layer=2, kernels="cuda").cuda()
    cuda_model.load_state_dict(torch_model.state_dict())
    idx = tokens(2, 128).cuda()
    with torch.no_grad():
        torch.testing.assert_close(cuda_model(idx)[0], torch_model(idx)[0], atol=1e-4, rtol=1e-4)


# --- mixtures of experts --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_aux_loss_present_and_positive_for_moe_only(kind: str) -> None:
    model = make(kind)
    assert model.aux_loss() is None  # nothing before a forward
    model(tokens(2, 8))
    aux = model.aux_loss()
    if kind not in MOE:
        assert aux is None
        return
    assert aux.ndim == 0 and aux.item() > 0
    aux.backward()
    routers = [m.router.weight.grad for m in model.modules() if isinstance(m, MoE)]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)


def test_balance_loss_is_one_times_the_weight_for_a_uniform_router() -> None:
    """Uniform router probabilities give n_experts * sum_e f_e / n_experts = 1, whatever the routing."""
    moe = MoE(8, 4, 2, 0.03, lambda: torch.nn.Linear(8, 8))
    torch.nn.init.zeros_(moe.router.weight)
    moe(torch.randn(3, 5, 8))
    torch.testing.assert_close(moe.weighted_loss, torch.tensor(0.03))


def test_moe_layers_where_asked() -> None:
    jamba = make("jamba")
    kinds = [(layer.is_attention, isinstance(layer.mlp, MoE)) for layer in jamba.layers]
    assert kinds == [(False, False), (True, True), (False, False), (True, True)]
    assert [isinstance(b.mlp, MoE) for b in make("gpt_moe").blocks] == [True, True]
    assert [isinstance(b.mlp, MoE) for b in make("llama_moe", moe_every=2).blocks] == [False, True]


def test_default_jamba_pattern_is_one_attention_in_eight_at_offset_four() -> None:
    model = Jamba(VOCAB, d_model=16, n_layer=16, n_head=2, d_state=2, expand=1)
    assert [i for i, layer in enumerate(model.layers) if layer.is_attention] == [4, 12]


# --- Llama specifics ------------------------------------------------------------------------------


def test_llama_refuses_longer_context_unless_rope_is_scaled() -> None:
    with pytest.raises(ValueError, match="model.rope_scaling") as info:
        make("llama")(tokens(1, BLOCK + 1))
    assert "\n" not in str(info.value)
    scaled = make("llama", rope_scaling=2.0).eval()
    assert scaled.context_length == 2 * BLOCK
    with torch.no_grad():
        full, _ = scaled(tokens(1, 2 * BLOCK))
        state = scaled.init_state(1, "cpu")
        first, state = scaled(tokens(1, 2 * BLOCK)[:, :20], state)
        second, _ = scaled(tokens(1, 2 * BLOCK)[:, 20:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=1e-5)


def test_llama_shape_rules() -> None:
    model = make("llama", d_model=48, n_head=4)
    assert model.blocks[0].mlp.gate.out_features == 128  # 8/3 * 48 = 128, a multiple of 32
    assert all(not n.endswith("bias") for n, _ in model.named_parameters())
    assert model.lm_head.weight is model.wte.weight
    untied = make("llama", d_model=48, n_head=4, tie_weights=False)
    assert count_parameters(untied) == count_parameters(model) + model.wte.weight.numel()


def test_rope_scores_depend_on_distance_only() -> None:
    """RoPE's point: a query-key score sees their distance, not where they sit; scaling divides positions."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 7, generator=g), torch.randn(1, 1, 1, 7, generator=g)  # odd head_dim

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rope(q, torch.tensor([m]), 10000.0) * apply_rope(k, torch.tensor([n]), 10000.0)).sum()

    torch.testing.assert_close(score(3, 1), score(40, 38))
    assert not torch.allclose(score(3, 1), score(3, 2))
    assert torch.equal(apply_rope(q, torch.tensor([5]), 10000.0)[..., -1], q[..., -1])  # the odd channel stays
    torch.testing.assert_close(apply_rope(q, torch.tensor([6]), 500.0, 2.0), apply_rope(q, torch.tensor([3]), 500.0))


# --- the recurrent model's Zaremba options --------------------------------------------------------


def test_recurrent_init_range_sets_every_parameter() -> None:
    torch.manual_seed(0)
    model = RecurrentLM(VOCAB, cell="lstm", d_model=16, n_layer=2, init_range=0.05, tie_weights=False)
    assert all(p.abs().max() <= 0.05 for p in model.parameters())
    assert all((p != 0).all() and p.abs().max() > 0.03 for p in model.parameters())  # biases drawn too
    torch.manual_seed(0)
    default = RecurrentLM(VOCAB, cell="lstm", d_model=16, n_layer=2)
    assert default.lm_head.bias.abs().sum() == 0 and default.rnn.weight_hh_l0.abs().max() > 0.1  # 1/sqrt(16)


# --- configs and bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "lstm_attn", "mamba", "jamba"])
def test_model_configs_build(name: str) -> None:
    node = OmegaConf.create({"data": {"block_size": 32}, "model": OmegaConf.load(CONF / f"{name}.yaml")})
    settings = OmegaConf.to_container(node.model, resolve=True)
    model = instantiate(settings, vocab_size=VOCAB)
    assert settings["_target_"] == f"lmlab.models.{type(model).__name__}"
    assert settings["d_model"] == 128 and model.n_layer == settings["n_layer"]
    assert model(tokens(1, 8))[0].shape == (1, 8, VOCAB)


@pytest.mark.parametrize(
    ("kind", "key", "value", "message"),
    [
        ("llama", "n_kv_head", 3, "n_kv_head must divide n_head"),
        ("llama", "rope_scaling", 0.5, "rope_scaling must be >= 1"),
        ("llama_moe", "top_k", 5, "top_k must be between 1 and n_experts"),
        ("gpt_moe", "top_k", 4, "top_k must be between 1 and n_experts"),
        ("gpt_moe", "n_experts", -1, "n_experts must be >= 0"),
        ("jamba", "attn_every", 5, "attn_every=5 is longer than the stack"),
        ("jamba", "attn_offset", 2, "attn_offset must be in"),
        ("jamba", "moe_every", 5, "moe_every=5 must be between 1 and"),
        ("jamba", "top_k", 5, "top_k must be between 1 and n_experts"),
        ("jamba", "d_state", 0, "d_state must be >= 1"),
        ("mamba", "d_state", 0, "d_state must be >= 1"),
        ("mamba", "expand", 0, "expand must be >= 1"),
        ("jamba", "expand", 0, "expand must be >= 1"),
        ("mamba", "scan", "fast", "scan must be one of auto, parallel, sequential"),
        ("mamba", "kernels", "fast", "kernels must be one of auto, torch, triton, cuda"),
        ("lstm_attn", "window", 0, "window must be >= 1"),
        ("lstm_attn", "n_head", 3, "d_model must be divisible by n_head"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(kind: str, key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        make(kind, **{key: value})
    text = str(info.value)
    assert f"model.{key}" in text and "\n" not in text


@pytest.mark.skipif(cuda_selective_scan() is not None, reason="mamba-ssm is installed here")
def test_cuda_kernels_refused_without_mamba_ssm() -> None:
    with pytest.raises(ValueError, match="model.kernels=auto"):
        make("mamba", kernels="cuda")
