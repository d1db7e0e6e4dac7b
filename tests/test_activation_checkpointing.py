"""perf.activation_checkpointing: each block's activations are recomputed in the backward pass.

The loss and every gradient are the ones computed without it (dropout included), far fewer bytes are
kept for the backward pass, and nothing changes outside training: evaluation, generation, weights.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import lmlab.models.base
from lmlab.errors import ConfigError
from lmlab.generate import IncrementalDecoder
from lmlab.models import GPT, Jamba, LanguageModel, Llama, LSTMAttentionLM, Mamba, MoEConfig, RecurrentLM, TransformerLM
from lmlab.perf import Perf, apply_perf
from lmlab.run.train import train
from lmlab.task import LanguageModelTask
from tests.commands import run_command
from tests.helpers import REPO, compose_config, tiny_overrides

VOCAB, BLOCK = 41, 16
EXACT = dict(rtol=1e-6, atol=1e-7)  # the same kernels on the same inputs: equal but for summation order


def make(kind: str, n_layer: int = 2, d_model: int = 32, dropout: float = 0.2, **extra) -> LanguageModel:
    """A tiny model of each family made of repeated blocks, from seed 0."""
    torch.manual_seed(0)
    sizes = dict(d_model=d_model, n_layer=n_layer, dropout=dropout)
    if kind == "gpt":
        return GPT(VOCAB, n_head=2, block_size=BLOCK, **sizes, **extra)
    if kind == "transformer":
        return TransformerLM(VOCAB, n_head=2, block_size=BLOCK, **sizes, **extra)
    if kind == "llama":
        return Llama(VOCAB, n_head=4, n_kv_head=2, block_size=BLOCK, **sizes, **extra)
    if kind == "mamba":
        return Mamba(VOCAB, d_state=4, d_conv=3, kernels="torch", **sizes, **extra)
    # Mamba, attention, Mamba, attention...; a mixture of experts on every second layer
    return Jamba(VOCAB, n_head=2, n_kv_head=1, attn_every=2, attn_offset=1, block_size=BLOCK, **sizes, **extra)


FAMILIES = ["gpt", "transformer", "llama", "mamba", "jamba"]


def tokens(batch: int = 3, length: int = BLOCK, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: LanguageModel, checkpointing: bool, x: torch.Tensor, y: torch.Tensor):
    """(cross-entropy, auxiliary loss, {name: gradient}) of one training step from dropout seed 1."""
    model.train().zero_grad()
    model.activation_checkpointing = checkpointing
    torch.manual_seed(1)
    logits, _ = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    aux = model.aux_loss()
    (loss if aux is None else loss + aux).backward()
    return loss.detach(), aux, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", FAMILIES)
def test_checkpointing_gives_the_same_loss_and_gradients_with_dropout(kind):
    model, x, y = make(kind), tokens(), tokens(seed=2)
    loss, _, grads = loss_and_grads(model, False, x, y)
    checkpointed_loss, _, checkpointed_grads = loss_and_grads(model, True, x, y)
    torch.testing.assert_close(checkpointed_loss, loss, **EXACT)
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed_grads[name], grad, **EXACT, msg=name)


def blocks_of(model: LanguageModel) -> torch.nn.ModuleList:
    return model.layers if isinstance(model, Jamba) else model.blocks


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_block_runs_once_more_in_the_backward_pass(kind):
    model, x = make(kind), tokens()
    calls = []
    for block in blocks_of(model):
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    for checkpointing, runs in ((False, 1), (True, 2)):
        calls.clear()
        loss_and_grads(model, checkpointing, x, tokens(seed=2))
        assert len(calls) == runs * len(blocks_of(model))


def saved_activation_bytes(model: LanguageModel, forward: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes of the tensors `forward()` keeps for the backward pass (each storage once, the weights
    left out), and what it returned."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    return sum(saved.values()), output


@pytest.mark.parametrize("kind", FAMILIES)
def test_checkpointing_keeps_far_fewer_bytes_for_the_backward_pass(kind):
    """4 layers: each block keeps ~20 activations of the residual stream's size without checkpointing,
    none with it (its input is the previous block's output, kept anyway)."""
    model, x = make(kind, n_layer=4, d_model=64).train(), tokens(batch=4)
    model.activation_checkpointing = False
    kept, _ = saved_activation_bytes(model, lambda: model(x))
    model.activation_checkpointing = True
    checkpointed_kept, _ = saved_activation_bytes(model, lambda: model(x))
    assert checkpointed_kept < kept / 3


@pytest.mark.parametrize("kind", ["gpt", "jamba"])
def test_the_mixture_of_experts_loss_and_its_router_gradients_survive_the_recompute(kind):
    """MoE layers keep their load-balancing loss on the module during the forward; its gradient reaches
    the routers through the recomputed blocks, as it does without checkpointing."""
    model = make(kind, moe=MoEConfig(n_experts=4, top_k=2, moe_every=1, aux_loss_weight=1.0))
    x, y = tokens(), tokens(seed=2)
    _, aux, grads = loss_and_grads(model, False, x, y)
    _, checkpointed_aux, checkpointed_grads = loss_and_grads(model, True, x, y)
    assert checkpointed_aux.requires_grad
    torch.testing.assert_close(checkpointed_aux, aux, **EXACT)
    routers = [name for name in grads if name.endswith("router.weight")]
    assert routers
    for name in routers:
        torch.testing.assert_close(checkpointed_grads[name], grads[name], **EXACT, msg=name)

    def router_grads_of_the_aux_loss_alone(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)
        model(x)
        model.aux_loss().backward()
        return [model.get_parameter(name).grad.clone() for name in routers]

    alone = router_grads_of_the_aux_loss_alone(False)
    assert all(grad.abs().sum() > 0 for grad in alone)
    for checkpointed, plain in zip(router_grads_of_the_aux_loss_alone(True), alone):
        torch.testing.assert_close(checkpointed, plain, **EXACT)


@pytest.mark.parametrize("kind", ["gpt", "llama", "jamba"])
def test_the_recompute_runs_on_the_attention_kernel_the_forward_was_pinned_to(kind):
    """perf.attention pins a kernel around the forward only; the backward's recompute must use it too,
    or it saves other tensors than the forward did (the math kernel's weights, flash's log-sum-exp).
    Dropout 0: a CPU's flash kernel has no dropout, so with it the math kernel runs pinned or not."""
    model, x, y = make(kind, dropout=0.0), tokens(), tokens(seed=2)
    results = []
    for checkpointing in (False, True):
        model.train().zero_grad()
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)
        with sdpa_kernel([SDPBackend.MATH]):
            logits, _ = model(x)
        aux = model.aux_loss()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        (loss if aux is None else loss + aux).backward()
        results.append([p.grad.clone() for p in model.parameters()])
    for checkpointed, plain in zip(results[1], results[0]):
        torch.testing.assert_close(checkpointed, plain, **EXACT)


def spy_on_checkpointing(monkeypatch) -> list[torch.nn.Module]:
    """The blocks handed to activation checkpointing from here on."""
    checkpointed, blocks = lmlab.models.base.checkpointed, []

    def spy(block, *args):
        blocks.append(block)
        return checkpointed(block, *args)

    monkeypatch.setattr(lmlab.models.base, "checkpointed", spy)
    return blocks


@pytest.mark.parametrize("kind", FAMILIES)
def test_evaluation_no_grad_and_cached_generation_are_unchanged(kind, monkeypatch):
    plain, checkpointing = make(kind), make(kind)
    checkpointing.activation_checkpointing = True
    spied = spy_on_checkpointing(monkeypatch)
    x = tokens()
    for mode in ("eval", "no_grad"):
        for model in (plain, checkpointing):
            model.train(mode == "no_grad")
        torch.manual_seed(1)
        with torch.no_grad():
            expected, _ = plain(x)
        torch.manual_seed(1)
        with torch.no_grad():
            logits, _ = checkpointing(x)
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    checkpointing.eval()
    plain.eval()
    prompt, fed = tokens(2, 5), tokens(2, BLOCK - 5, seed=3)
    cached, expected = IncrementalDecoder(checkpointing, prompt), IncrementalDecoder(plain, prompt)
    torch.testing.assert_close(cached.logits, expected.logits, rtol=0, atol=0)
    for token in fed.T:
        torch.testing.assert_close(cached.append(token), expected.append(token), rtol=0, atol=0)
    assert not spied
    checkpointing.train()(x)  # with gradients: each block checkpointed
    assert len(spied) == len(blocks_of(checkpointing))


@pytest.mark.parametrize("kind", FAMILIES)
def test_weights_keep_their_names_and_checkpoints_load_either_way(kind):
    plain, checkpointed = make(kind), make(kind)
    apply_perf(checkpointed, Perf(activation_checkpointing=True))
    task = LanguageModelTask(checkpointed, optimizer=torch.optim.AdamW)
    assert task.model.activation_checkpointing
    assert list(task.model.state_dict()) == list(plain.state_dict())
    assert [name for name, _ in task.model.named_parameters()] == [name for name, _ in plain.named_parameters()]
    plain.load_state_dict(task.model.state_dict())
    assert list(task.state_dict()) == list(LanguageModelTask(make(kind), optimizer=torch.optim.AdamW).state_dict())


MESSAGE = "perf.activation_checkpointing=true needs a model made of repeated blocks"


@pytest.mark.parametrize(
    "model",
    [
        RecurrentLM(VOCAB, cell="rnn", d_model=16, n_layer=2),
        RecurrentLM(VOCAB, cell="lstm", d_model=16, n_layer=2),
        LSTMAttentionLM(VOCAB, d_model=16, n_layer=1, n_head=2, window=4),
    ],
    ids=["rnn", "lstm", "lstm_attn"],
)
def test_a_model_without_repeated_blocks_is_refused(model):
    with pytest.raises(ConfigError, match=MESSAGE) as raised:
        apply_perf(model, Perf(activation_checkpointing=True))
    assert f"{type(model).__name__} has none: set perf.activation_checkpointing=false" in str(raised.value)
    apply_perf(model, Perf())  # off: trains as before
    assert not model.activation_checkpointing


@pytest.mark.slow
def test_train_py_refuses_a_recurrent_model_in_one_line(tmp_path, small_corpus):
    run = tmp_path / "run"
    overrides = [*tiny_overrides("lstm", small_corpus), "perf.activation_checkpointing=true", f"hydra.run.dir={run}"]
    result = run_command([sys.executable, "train.py", *overrides], cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    *_, line = [line for line in result.stderr.splitlines() if line.strip()]
    assert line == (
        "error: perf.activation_checkpointing=true needs a model made of repeated blocks "
        "(transformer, gpt, llama, mamba, mamba2, jamba); RecurrentLM has none: set perf.activation_checkpointing=false"
    )
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_a_checkpointed_train_py_run_scores_as_the_plain_one(tmp_path, small_corpus, monkeypatch):
    """Same seed, dropout on: the checkpointed run recomputes its blocks and reaches the plain run's
    scores to float rounding, having learned (val/bpb well below a uniform guess's)."""
    spied = spy_on_checkpointing(monkeypatch)
    scores = {}
    for checkpointing in (False, True):
        overrides = [*tiny_overrides("gpt", small_corpus), "model.dropout=0.1", "model.n_layer=2"]
        overrides += ["trainer.precision=32-true", f"perf.activation_checkpointing={str(checkpointing).lower()}"]
        run = tmp_path / str(checkpointing)
        train(compose_config(overrides, run))
        scores[checkpointing] = json.loads((run / "metrics.json").read_text())
        assert bool(spied) == checkpointing
    assert scores[True]["status"] == "completed" and scores[True]["steps"] == 20
    assert scores[True]["val/bpb"] < 0.85 * math.log2(scores[True]["vocab_size"])
    for key in ("val/bpb", "test/bpb"):
        assert scores[True][key] == pytest.approx(scores[False][key], rel=1e-5), key


@pytest.mark.slow
def test_compiled_checkpointed_training_matches_eager_and_still_recomputes():
    """perf.compile=true: torch.compile traces the checkpointed blocks and recomputes them in its own
    backward (about 20 s of compiling on a CPU). Dropout 0: compiled code draws other random numbers."""
    x, y = tokens(batch=4), tokens(batch=4, seed=2)

    def step(compile: bool, checkpointing: bool):
        model = make("gpt", n_layer=4, d_model=64, dropout=0.0)
        perf = Perf(compile=compile, activation_checkpointing=checkpointing)
        apply_perf(model, perf)
        task = LanguageModelTask(model, optimizer=torch.optim.AdamW, perf=perf)
        kept, (loss, _) = saved_activation_bytes(model, lambda: task._step_loss(x, y, training=True))
        loss.backward()
        return kept, loss.detach(), [p.grad for p in model.parameters()]

    plain_kept, _, _ = step(compile=False, checkpointing=False)
    _, eager_loss, eager_grads = step(compile=False, checkpointing=True)
    compiled_kept, compiled_loss, compiled_grads = step(compile=True, checkpointing=True)
    assert compiled_kept < plain_kept / 3
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
