"""Every registered model family honours the one contract: shapes, causality, cached == uncached,
chunked == full, carried state, learning, generation, parameter matching, export, configs that match
the constructors, and bad input in one line. The first part is parametrised over the registry, so a
family added there is held to it with no edit here; the second holds each family's own specifics."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmlab.checkpoint.format import build_model
from lmlab.errors import ConfigError
from lmlab.export import exporter_for, exporters
from lmlab.generate import stream_tokens
from lmlab.models import (
    HybridCache,
    Jamba,
    KVCache,
    LanguageModel,
    LSTMAttentionLM,
    Mamba,
    MemoryState,
    MoEConfig,
    RecurrentLM,
    SSMCache,
    count_parameters,
    detach_state,
    families,
    family,
    select_state,
    state_from_data,
    state_to_data,
)
from lmlab.models.mamba import cuda_selective_scan
from lmlab.models.moe import MoE
from lmlab.models.registry import accepts
from lmlab.models.rope import apply_rope
from lmlab.models.scan import parallel_scan, resolve_scan, selective_scan, sequential_scan
from lmlab.run.sizing import TOLERANCE, match_params
from tests.helpers import CONF, compose_config

VOCAB, BLOCK = 11, 16
MIXTURE = MoEConfig(n_experts=3, top_k=2)  # the experts a family with dense defaults is also tested with


def variants() -> list:
    """Every registered family at its tiny shape, and each dense family that takes `moe` once more with experts."""
    cases = []
    for f in families():
        cases.append(pytest.param(f.name, {}, id=f.name))
        moe = inspect.signature(f.model).parameters.get("moe")
        if moe is not None and MoEConfig.of(moe.default).n_experts == 0:
            cases.append(pytest.param(f.name, {"moe": MIXTURE}, id=f"{f.name}_moe"))
    return cases


VARIANTS = variants()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: thread hand-offs cost more than they save, most of all on a busy CPU."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def make(name: str, **overrides) -> LanguageModel:
    """Family `name`'s tiny model from seed 0, at least two layers deep (so a cache or state passes
    between layers) and without dropout unless overridden."""
    torch.manual_seed(0)
    f = family(name)
    deep = {"n_layer": max(2, f.tiny.get("n_layer", 2))} if accepts(f.model, "n_layer") else {}
    quiet = {"dropout": 0.0} if accepts(f.model, "dropout") else {}
    return f.build_tiny(**{"vocab_size": VOCAB, "block_size": BLOCK, **deep, **quiet, **overrides})


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def state_tensors(state) -> list[torch.Tensor]:
    """Every tensor of a state, in a fixed order (read off its plain-data form)."""

    def flat(data: object) -> list[torch.Tensor]:
        if isinstance(data, torch.Tensor):
            return [data]
        values = data.values() if isinstance(data, dict) else data if isinstance(data, tuple) else ()
        return [t for value in values for t in flat(value)]

    return flat(state_to_data(state))


# --- the contract, for every registered family ------------------------------------------------------


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
@pytest.mark.parametrize("pad_vocab_to", [1, 8])
def test_output_shape_and_padding(name: str, extra: dict, pad_vocab_to: int) -> None:
    model = make(name, pad_vocab_to=pad_vocab_to, **extra)
    logits, state = model(tokens(3, 7))
    assert logits.shape == (3, 7, VOCAB) and logits.dtype == torch.float32
    assert model.lm_head.weight.shape[0] == (16 if pad_vocab_to == 8 else VOCAB)
    assert model.vocab_size == VOCAB
    if model.carries_state:  # a summary of all it read: no context limit, and always returned
        assert model.context_length is None and state is not None
    else:  # a window over the context: a state only when given one
        assert model.context_length == BLOCK and state is None


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
def test_causality(name: str, extra: dict) -> None:
    """Changing a token never changes the logits before it, and does change some after it."""
    model = make(name, **extra).eval()
    idx = tokens(2, 12)
    with torch.no_grad():
        reference, _ = model(idx)
        for t in (0, 4, 5, 10):
            changed = idx.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % VOCAB  # differs at every later position
            logits, _ = model(changed)
            torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(logits[:, t + 1 :], reference[:, t + 1 :])


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 1, 1, 1, 1, 1], [4, 3, 1, 4], [7, 5], [12]])
def test_chunked_forward_matches_full(name: str, extra: dict, chunks: list[int]) -> None:
    """Feeding the sequence piece by piece through the state gives the full forward's logits;
    [4, 3, ...] exercises a multi-token chunk on top of a filled cache (the explicit mask)."""
    model = make(name, **extra).eval()
    idx = tokens(2, sum(chunks))
    with torch.no_grad():
        full, _ = model(idx)
        state, pieces, start = model.init_state(2, "cpu"), [], 0
        for n in chunks:
            logits, state = model(idx[:, start : start + n], state)
            pieces.append(logits)
            start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    if model.supports_static_cache:
        assert isinstance(state, KVCache) and state.length == start


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
def test_cached_generation_matches_uncached(name: str, extra: dict) -> None:
    """Greedy generation one token at a time through the state gives the logits of re-running the prefix."""
    model = make(name, **extra).eval()
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


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
def test_state_carries_across_batches_from_none(name: str, extra: dict) -> None:
    """Truncated BPTT starts from state=None and carries what comes back (detached): the logits and the
    final state are those of one pass over the whole text. Models without the capability return none."""
    model = make(name, **extra).eval()
    idx = tokens(2, 10)
    with torch.no_grad():
        full, full_state = model(idx)
        first, state = model(idx[:, :6])
        if not model.carries_state:
            assert state is None and full_state is None
            return
        second, state = model(idx[:, 6:], detach_state(state))
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=1e-5)
    for a, b in zip(state_tensors(state), state_tensors(full_state), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
def test_detach_state_cuts_history(name: str, extra: dict) -> None:
    model = make(name, **extra)
    _, state = model(tokens(2, 5), model.init_state(2, "cpu"))
    assert state_tensors(state) and all(t.requires_grad for t in state_tensors(state))
    detached = detach_state(state)
    assert type(detached) is type(state)
    assert all(not t.requires_grad and t.grad_fn is None for t in state_tensors(detached))
    assert detach_state(None) is None


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
def test_select_state_follows_reordered_rows(name: str, extra: dict) -> None:
    """Beam search keeps rows [2, 0, 0] of a state: continuing from it equals running those rows afresh."""
    model = make(name, **extra).eval()
    prompt, nxt = tokens(3, 5), tokens(3, 2, seed=2)
    index = torch.tensor([2, 0, 0])
    with torch.no_grad():
        _, state = model(prompt, model.init_state(3, "cpu"))
        reordered, _ = model(nxt, select_state(state, index))
        fresh, _ = model(torch.cat([prompt[index], nxt], dim=1), model.init_state(3, "cpu"))
    torch.testing.assert_close(reordered, fresh[:, 5:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
def test_states_survive_a_plain_data_checkpoint(name: str, extra: dict, tmp_path: Path) -> None:
    """A carried state written as plain data reloads with weights_only=True and continues identically."""
    model = make(name, **extra).eval()
    idx = tokens(2, 9)
    with torch.no_grad():
        _, state = model(idx[:, :5], model.init_state(2, "cpu"))
        torch.save({"carried_state": state_to_data(state)}, tmp_path / "state.pt")
        loaded = state_from_data(torch.load(tmp_path / "state.pt", weights_only=True)["carried_state"])
        assert type(loaded) is type(state)
        expected, _ = model(idx[:, 5:], select_state(state, torch.arange(2)))
        resumed, _ = model(idx[:, 5:], loaded)
    torch.testing.assert_close(resumed, expected, atol=0, rtol=0)


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
def test_training_lowers_loss(name: str, extra: dict) -> None:
    model = make(name, **extra).train()
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


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
def test_aux_loss_and_data_dependent_shapes_come_with_experts_only(name: str, extra: dict) -> None:
    model = make(name, **extra)
    routed = [m for m in model.modules() if isinstance(m, MoE)]
    assert model.has_data_dependent_shapes() == bool(routed)  # no CUDA-graph capture of a routed step
    assert model.aux_loss() is None  # nothing before a forward
    model(tokens(2, 8))
    aux = model.aux_loss()
    if not routed:
        assert aux is None
        return
    assert aux.ndim == 0 and aux.item() > 0
    aux.backward()
    assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in routed)


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
def test_generation_runs_past_the_context_and_stays_in_the_vocabulary(name: str, extra: dict) -> None:
    model = make(name, **extra).eval()
    out = list(stream_tokens(model, tokens(1, 3), 2 * BLOCK, temperature=0))
    assert len(out) == 2 * BLOCK and all(0 <= int(t) < VOCAB for t in out)


@pytest.mark.parametrize("name", [f.name for f in families()])
def test_context_is_enforced_or_unbounded(name: str) -> None:
    model = make(name)
    if model.context_length is None:
        logits, _ = model(tokens(1, 4 * BLOCK))
        assert logits.shape == (1, 4 * BLOCK, VOCAB)
        return
    with pytest.raises(ValueError, match=f"exceeds the context length {BLOCK}"):
        model(tokens(1, BLOCK + 1))
    state = model.init_state(1, "cpu")
    with torch.no_grad():
        model(tokens(1, 10), state)
        with pytest.raises(ValueError, match="10 cached"):
            model(tokens(1, 7), state)


@pytest.mark.parametrize("name", [f.name for f in families()])
def test_capabilities_agree_with_the_model(name: str, monkeypatch) -> None:
    """What generic code reads off the class: the blocks a forward runs through call_block (those that
    activation checkpointing recomputes) are the declared block_types, one per layer; and a model
    supporting a static cache keeps a KVCache as its state."""
    model = make(name)
    called = []
    plain_call = model.call_block
    monkeypatch.setattr(model, "call_block", lambda block, *args: called.append(block) or plain_call(block, *args))
    model(tokens(1, 4))
    assert all(isinstance(block, model.block_types) for block in called) and bool(called) == bool(model.block_types)
    declared = [m for m in model.modules() if isinstance(m, model.block_types)] if model.block_types else []
    assert called == declared and len(called) == (model.n_layer if model.block_types else 0)
    if model.supports_static_cache:
        assert isinstance(model.init_state(1, "cpu"), KVCache)


@pytest.mark.parametrize("name", [f.name for f in families()])
def test_parameter_matching_lands_within_tolerance(name: str) -> None:
    config = compose_config([f"model={name}"], Path("unused")).model
    match = match_params(config, 65, 35_000)
    assert abs(match.off(35_000)) <= TOLERANCE, match


@pytest.mark.parametrize(("name", "extra"), VARIANTS)
def test_export_succeeds_or_refuses_in_one_line(name: str, extra: dict) -> None:
    model = make(name, **extra)
    if type(model) not in exporters():
        with pytest.raises(ConfigError, match="cannot be exported to transformers") as refused:
            exporter_for(model)
        assert "\n" not in str(refused.value)
        return
    exporter = exporter_for(model)
    if extra.get("moe"):  # experts have no transformers equivalent
        with pytest.raises(ConfigError, match="model.moe.n_experts=0") as refused:
            exporter.config(model)
        assert "\n" not in str(refused.value)
        return
    assert exporter.config(model)["vocab_size"] == VOCAB


# --- configs: written once, in conf/model, equal to the constructors' defaults ----------------------


def yaml_names() -> list[str]:
    return sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def test_every_model_yaml_is_a_registered_family_and_back() -> None:
    assert yaml_names() == sorted(f.name for f in families())


@pytest.mark.parametrize("name", yaml_names())
def test_the_model_node_holds_every_constructor_argument_at_its_default(name: str, tmp_path: Path) -> None:
    """model=NAME composes to each constructor argument (but vocab_size, known once the tokenizer is
    trained) at the class's default, or at the family's own setting (RecurrentLM's cell), and no other key."""
    f = family(name)
    settings = OmegaConf.to_container(compose_config([f"model={name}"], tmp_path).model, resolve=True)
    assert settings.pop("_target_") == f"{f.model.__module__.rsplit('.', 1)[0]}.{f.model.__name__}"
    parameters = {p.name: p.default for p in inspect.signature(f.model).parameters.values() if p.name != "vocab_size"}
    assert sorted(settings) == sorted(parameters)
    for key, value in settings.items():
        default = f.settings.get(key, parameters[key])
        if key == "moe":
            value, default = MoEConfig.of(value), MoEConfig.of(default)
        assert value == default, f"model.{key}: yaml {value!r}, {f.model.__name__} default {default!r}"
    model = instantiate({"_target_": f"{f.model.__module__}.{f.model.__name__}", **settings}, vocab_size=VOCAB)
    assert model(tokens(1, 8))[0].shape == (1, 8, VOCAB)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layr=2", "Key 'n_layr' not in 'GPTConfig'"),
        ("model.n_layer=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("model.logit_softcap=soft", "Value 'soft' of type 'str' could not be converted to Float"),
        ("model.moe.n_expert=4", "Key 'n_expert' not in 'MoEConfig'"),
    ],
)
def test_the_schema_refuses_unknown_keys_and_wrong_types_when_composed(override, message, tmp_path) -> None:
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config(["model=gpt", override], tmp_path)
    assert override.split("=")[0] in str(caught.value) and message in str(caught.value.__cause__)


def test_schema_values_reach_the_model_nested_ones_included(tmp_path) -> None:
    cfg = compose_config(["model=jamba", "model.moe.n_experts=3", "model.dt_rank=null"], tmp_path)
    assert cfg.model.moe == {
        "n_experts": 3,
        "top_k": 2,
        "moe_every": 2,
        "aux_loss_weight": 0.01,
        "capacity_factor": None,
    }
    model = build_model({**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": VOCAB})
    assert [len(m.experts) for m in model.modules() if isinstance(m, MoE)] == [3, 3]


def test_a_checkpoint_from_before_model_moe_still_builds_its_model() -> None:
    """Earlier versions kept the MoE keys at the top of the model config; checkpoints hold it as written."""
    old = {"_target_": "lmlab.models.GPT", "vocab_size": VOCAB, "d_model": 16, "n_layer": 2, "n_head": 2}
    model = build_model({**old, "n_experts": 3, "top_k": 1, "moe_every": 2, "aux_loss_weight": 0.01})
    assert [isinstance(block.mlp, MoE) for block in model.blocks] == [False, True]
    assert build_model(old).aux_loss() is None


def test_moe_settings_come_as_a_mapping_or_the_dataclass_and_unknown_keys_are_named() -> None:
    assert MoEConfig.of({"n_experts": 4}) == MoEConfig(n_experts=4) and MoEConfig.of(None) == MoEConfig()
    with pytest.raises(ValueError, match="model.moe.n_expert") as info:
        MoEConfig.of({"n_expert": 4})
    assert "\n" not in str(info.value)


# --- bad input: one line naming the key ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        ("lstm", "vocab_size", 0, "vocab_size must be"),
        ("gru", "d_model", 0, "d_model must be"),
        ("rnn", "n_layer", 0, "n_layer must be"),
        ("lstm", "dropout", 1.0, "dropout must be"),
        ("lstm", "cell", "transformer", "cell must be"),
        ("lstm", "pad_vocab_to", 0, "pad_vocab_to must be"),
        ("transformer", "n_head", 0, "n_head must be"),
        ("transformer", "d_ff", 0, "d_ff must be"),
        ("transformer", "block_size", 0, "block_size must be"),
        ("transformer", "dropout", -0.1, "dropout must be"),
        ("gpt", "n_layer", 0, "n_layer must be"),
        ("gpt", "block_size", -1, "block_size must be"),
        ("gpt", "vocab_size", 0, "vocab_size must be"),
        ("llama", "n_kv_head", 3, "n_kv_head must divide n_head"),
        ("llama", "rope_scaling", 0.5, "rope_scaling must be >= 1"),
        ("jamba", "attn_every", 5, "attn_every=5 is longer than the stack"),
        ("jamba", "attn_offset", 2, "attn_offset must be in"),
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
def test_invalid_config_is_one_line_naming_the_key(name: str, key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        make(name, **{key: value})
    text = str(info.value)
    assert f"model.{key}" in text and "\n" not in text


@pytest.mark.parametrize(
    ("name", "moe", "key", "message"),
    [
        ("llama", {"n_experts": 4, "top_k": 5}, "top_k", "top_k must be between 1 and n_experts"),
        ("gpt", {"n_experts": 3, "top_k": 4}, "top_k", "top_k must be between 1 and n_experts"),
        ("gpt", {"n_experts": -1}, "n_experts", "n_experts must be >= 0"),
        ("jamba", {"n_experts": 4, "moe_every": 5}, "moe_every", "moe_every=5 must be between 1 and"),
        ("jamba", {"n_experts": 4, "top_k": 5}, "top_k", "top_k must be between 1 and n_experts"),
        ("gpt", {"n_experts": 2, "aux_loss_weight": -1.0}, "aux_loss_weight", "aux_loss_weight must be >= 0"),
    ],
)
def test_invalid_moe_settings_are_one_line_naming_the_key(name: str, moe: dict, key: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        make(name, n_layer=4, moe=moe)
    text = str(info.value)
    assert f"model.moe.{key}" in text and "\n" not in text


@pytest.mark.parametrize("name", ["transformer", "gpt"])
def test_heads_must_divide_width(name: str) -> None:
    with pytest.raises(ValueError, match="d_model must be divisible by n_head"):
        make(name, d_model=10, n_head=3)


@pytest.mark.skipif(cuda_selective_scan() is not None, reason="mamba-ssm is installed here")
def test_cuda_kernels_refused_without_mamba_ssm() -> None:
    with pytest.raises(ValueError, match="model.kernels=auto"):
        make("mamba", kernels="cuda")


# --- each family's specifics --------------------------------------------------------------------


def test_gpt_weight_tying_counted_once() -> None:
    model = make("gpt")
    assert model.lm_head.weight is model.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values())
    with_duplicate = sum(p.numel() for p in model.state_dict().values())  # state_dict lists both names
    assert count_parameters(model) == with_duplicate - model.wte.weight.numel()


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_optional_tying(name: str) -> None:
    tied, untied = make(name), make(name, tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert count_parameters(untied) == count_parameters(tied) + tied.wte.weight.numel()


def test_transformer_positions_are_fixed() -> None:
    model = make("transformer", d_model=16)
    assert "pos_enc" in dict(model.named_buffers())
    assert model.pos_enc.shape == (BLOCK, 16)
    assert all("pos" not in name for name, _ in model.named_parameters())


def test_gpt_flops_per_token() -> None:
    """6N plus nanoGPT's 12 L H Q T: 2 layers, 2 heads of 8 channels, BLOCK tokens."""
    model = make("gpt", d_model=16, n_layer=2, n_head=2)
    n = count_parameters(model) - model.wpe.weight.numel()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 2 * 8 * BLOCK


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


def test_states_have_their_types() -> None:
    states = {name: make(name)(tokens(2, 5), make(name).init_state(2, "cpu"))[1] for name in ("llama", "jamba")}
    states |= {name: make(name)(tokens(2, 5))[1] for name in ("mamba", "lstm_attn")}
    llama = make("llama")
    assert (llama.n_head, llama.n_kv_head) == (4, 2)  # grouped-query attention
    assert isinstance(states["llama"], KVCache) and states["llama"].k.shape[2] == 2  # n_kv_head heads cached
    assert isinstance(states["jamba"], HybridCache) and states["jamba"].kv.length == 5
    assert isinstance(states["mamba"], SSMCache) and isinstance(states["lstm_attn"], MemoryState)


def test_recurrent_states_stay_a_fixed_size() -> None:
    """Mamba's state and LSTM-attention's memory do not grow with the text read."""
    torch.manual_seed(0)
    mamba = Mamba(VOCAB, d_model=16, n_layer=2, d_state=4, d_conv=3, expand=2).eval()
    lstm_attn = LSTMAttentionLM(VOCAB, d_model=16, n_layer=2, n_head=2, window=3, dropout=0.0).eval()
    with torch.no_grad():
        short, long = mamba(tokens(1, 3))[1], mamba(tokens(1, 40))[1]
        memory = lstm_attn(tokens(1, 40))[1]
    assert short.conv.shape == long.conv.shape == (2, 1, 32, 2) and short.ssm.shape == long.ssm.shape == (2, 1, 32, 4)
    assert memory.keys.shape == memory.values.shape == (1, 2, 3, 8)


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
    parallel = make("mamba", d_state=4, d_conv=3, scan="parallel", recompute_scan=recompute_scan)
    sequential = make("mamba", d_state=4, d_conv=3, scan="sequential", recompute_scan=False)
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


def test_balance_loss_is_one_times_the_weight_for_a_uniform_router() -> None:
    """Uniform router probabilities give n_experts * sum_e f_e / n_experts = 1, whatever the routing."""
    moe = MoE(8, 4, 2, 0.03, lambda: torch.nn.Linear(8, 8))
    torch.nn.init.zeros_(moe.router.weight)
    moe(torch.randn(3, 5, 8))
    torch.testing.assert_close(moe.weighted_loss, torch.tensor(0.03))


def test_moe_layers_where_asked() -> None:
    jamba = make("jamba", n_layer=4, moe={"n_experts": 4, "top_k": 2, "moe_every": 2})
    kinds = [(layer.is_attention, isinstance(layer.mlp, MoE)) for layer in jamba.layers]
    assert kinds == [(False, False), (True, True), (False, False), (True, True)]
    assert [isinstance(b.mlp, MoE) for b in make("gpt", moe=MoEConfig(n_experts=3, top_k=1)).blocks] == [True, True]
    llama = make("llama", moe=MoEConfig(n_experts=4, top_k=2, moe_every=2))
    assert [isinstance(b.mlp, MoE) for b in llama.blocks] == [False, True]


def test_the_papers_jamba_pattern_is_one_attention_in_eight_at_offset_four() -> None:
    """The class defaults are conf/model/jamba.yaml's small stack (1 in 4 at offset 2); the paper's
    pattern is asked for by name."""
    paper = Jamba(VOCAB, d_model=16, n_layer=16, n_head=2, d_state=2, expand=1, attn_every=8, attn_offset=4)
    assert [i for i, layer in enumerate(paper.layers) if layer.is_attention] == [4, 12]
    small = Jamba(VOCAB, d_model=16, n_layer=8, n_head=2, d_state=2, expand=1)
    assert [i for i, layer in enumerate(small.layers) if layer.is_attention] == [2, 6]


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
