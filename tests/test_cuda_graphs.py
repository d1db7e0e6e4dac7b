"""CUDA graphs (perf.cuda_graphs) replay a step's forward and backward: same numbers, fresh dropout, clear refusals.

The GPU tests run where a GPU is (`pytest tests/test_cuda_graphs.py` on the GPU machine); the CPU
tests check the choice of when graphs are used and the errors when they cannot be.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import pytorch_lightning as pl
import torch

from lmlab.errors import ConfigError
from lmlab.graphed_step import GraphCaptureError, GraphedTrainingStep
from lmlab.models import GPT, Jamba, Llama, LSTMAttentionLM, Mamba, MoEConfig, RecurrentLM, TransformerLM
from lmlab.perf import Perf, apply_perf
from lmlab.run.train import train
from lmlab.task import LanguageModelTask
from tests.helpers import compose_config, tiny_overrides

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
VOCAB = 41


def batches(n: int, batch: int = 4, block: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(s[:, :-1], s[:, 1:]) for s in (torch.randint(0, VOCAB, (batch, block + 1), generator=g) for _ in range(n))]


class StepLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(make_model, cuda_graphs, data, stateful: bool, precision: str = "32-true", **perf_options):
    """Per-step losses and final weights of a short GPU run, and whether it replayed a graph."""
    torch.manual_seed(0)
    model = make_model()
    perf = Perf(cuda_graphs=cuda_graphs, **perf_options)
    apply_perf(model, perf)
    task = LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=3e-3), stateful=stateful, perf=perf)
    losses = StepLosses()
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=len(data),
        max_epochs=-1,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    captured = task._graphed is not None and task._graphed.captured
    return losses.losses, [p.detach().cpu() for p in model.parameters()], captured


MODELS = {
    "lstm-stateful": (lambda: RecurrentLM(VOCAB, cell="lstm", d_model=32, n_layer=2, dropout=0.0), True),
    "gru": (lambda: RecurrentLM(VOCAB, cell="gru", d_model=32, n_layer=2, dropout=0.0), False),
    "gpt": (lambda: GPT(VOCAB, d_model=32, n_layer=2, n_head=2, block_size=16, dropout=0.0), False),
    "transformer": (lambda: TransformerLM(VOCAB, d_model=32, n_layer=1, n_head=2, block_size=16, dropout=0.0), False),
    "llama": (lambda: Llama(VOCAB, d_model=32, n_layer=2, n_head=4, n_kv_head=2, block_size=16), False),
    "lstm_attn": (lambda: LSTMAttentionLM(VOCAB, d_model=32, n_layer=2, n_head=2, window=4, dropout=0.0), False),
    "mamba": (lambda: Mamba(VOCAB, d_model=32, n_layer=2, d_state=4, d_conv=3, kernels="torch"), False),
}


@needs_gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_graphed_training_gives_the_eager_losses_and_weights(name):
    make_model, stateful = MODELS[name]
    data = batches(12)
    eager_losses, eager_weights, eager_captured = fit(make_model, False, data, stateful)
    losses, weights, captured = fit(make_model, True, data, stateful)
    assert captured and not eager_captured
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)  # steps 4-12 replayed, state carried
    for a, b in zip(weights, eager_weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_gpu
def test_graphed_training_with_activation_checkpointing_and_dropout_gives_the_eager_losses_and_weights():
    """Blocks recomputed inside the captured backward (perf.activation_checkpointing): each replay's
    recompute must draw the dropout masks of its own forward, as the eager steps do, and the random
    state checkpointing saves and restores inside the capture must leave the generator usable."""

    def make_model():
        return GPT(VOCAB, d_model=32, n_layer=2, n_head=2, block_size=16, dropout=0.1)

    data = batches(12)
    eager_losses, eager_weights, _ = fit(make_model, False, data, False, activation_checkpointing=True)
    losses, weights, captured = fit(make_model, True, data, False, activation_checkpointing=True)
    assert captured
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)  # steps 4-12 replayed
    for a, b in zip(weights, eager_weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.randint(0, VOCAB, (2, 5), device="cuda")  # sampling after training still works


@needs_gpu
def test_graphed_bf16_training_follows_the_eager_run():
    make_model, stateful = MODELS["lstm-stateful"]
    data = batches(10)
    eager, _, _ = fit(make_model, False, data, stateful, precision="bf16-mixed")
    graphed, _, captured = fit(make_model, True, data, stateful, precision="bf16-mixed")
    assert captured
    assert graphed == pytest.approx(eager, rel=1e-2)


def _graphed_step(model: torch.nn.Module) -> GraphedTrainingStep:
    def step(x, y, state):
        logits, state = model(x, state)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        return loss, loss, None, state

    return GraphedTrainingStep(step, list(model.parameters()), warmup_steps=1)


@needs_gpu
def test_each_replay_draws_fresh_dropout_masks():
    torch.manual_seed(0)
    model = GPT(VOCAB, d_model=32, n_layer=2, n_head=2, block_size=16, dropout=0.5).cuda()
    graphed = _graphed_step(model)
    x, y = (t.cuda() for t in batches(1)[0])
    losses = [graphed(x, y)[0].item() for _ in range(4)]  # one eager warm-up step, then capture and replays
    assert graphed.captured
    assert len(set(losses[1:])) == 3, losses


@needs_gpu
def test_a_batch_of_another_shape_runs_eagerly_into_the_graph_gradients():
    torch.manual_seed(0)
    model = RecurrentLM(VOCAB, cell="lstm", d_model=32, n_layer=1, dropout=0.0).cuda()
    graphed = _graphed_step(model)
    full, short = batches(1)[0], batches(1, batch=3, seed=1)[0]
    for _ in range(2):
        graphed(*(t.cuda() for t in full))
    grads = [p.grad for p in model.parameters()]
    x, y = (t.cuda() for t in short)
    loss, _, _ = graphed(x, y)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # the tensors the optimizer holds
    reference = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
    expected = torch.autograd.grad(reference, list(model.parameters()))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


@needs_gpu
def test_gradients_released_between_steps_are_bound_again():
    """Lightning sets every .grad to None before each validation; the next replay must hand the
    optimizer the graph's gradients again, not leave it with none (which silently stops training)."""
    torch.manual_seed(0)
    model = RecurrentLM(VOCAB, cell="lstm", d_model=32, n_layer=1, dropout=0.0).cuda()
    graphed = _graphed_step(model)
    x, y = (t.cuda() for t in batches(1)[0])
    for _ in range(3):
        graphed(x, y)
    model.zero_grad(set_to_none=True)
    graphed(x, y)
    reference = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
    for p, g in zip(model.parameters(), torch.autograd.grad(reference, list(model.parameters()))):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g)


class StackedLSTM(torch.nn.Module):
    """cuDNN's own dropout between LSTM layers, and nothing else random."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, 32)
        self.rnn = torch.nn.LSTM(32, 32, num_layers=2, dropout=0.5, batch_first=True)
        self.head = torch.nn.Linear(32, VOCAB)

    def forward(self, idx, state=None):
        x, state = self.rnn(self.wte(idx), state)
        return self.head(x), state


@needs_gpu
def test_cudnn_dropout_between_recurrent_layers_differs_between_replays():
    torch.manual_seed(0)
    model = StackedLSTM().cuda()
    graphed = _graphed_step(model)
    x, y = (t.cuda() for t in batches(1)[0])
    losses = [graphed(x, y)[0].item() for _ in range(4)]
    assert graphed.captured
    assert len(set(losses[1:])) == 3, losses


@needs_gpu
@pytest.mark.slow
@pytest.mark.parametrize("model", ["lstm", "gpt"])
def test_a_full_run_with_validation_and_test_scores_as_the_eager_one(tmp_path, small_corpus, model):
    scores = {}
    for graphs in (False, True):
        overrides = [*tiny_overrides(model, small_corpus, steps=24), "trainer.accelerator=gpu", "model.dropout=0.0"]
        overrides += ["trainer.precision=32-true", f"perf.cuda_graphs={str(graphs).lower()}", "seed=3"]
        overrides += ["data.stateful=true"] if model == "lstm" else []
        train(compose_config(overrides, tmp_path / str(graphs)))
        scores[graphs] = json.loads((tmp_path / str(graphs) / "metrics.json").read_text())
    for key in ("val/bpb", "test/bpb"):  # two validations (steps 12 and 24): training went on after the first
        assert scores[True][key] == pytest.approx(scores[False][key], rel=1e-4), key


class HostSyncingGPT(GPT):
    """A model whose forward reads a value on the host: legal eagerly, impossible inside a CUDA graph."""

    def forward(self, idx, state=None):
        if float(idx.float().mean()) < 0:
            raise AssertionError("never")
        return super().forward(idx, state)


def host_syncing_gpt() -> HostSyncingGPT:
    return HostSyncingGPT(VOCAB, d_model=32, n_layer=1, n_head=2, block_size=16, dropout=0.0)


@needs_gpu
def test_a_step_that_cannot_be_captured_says_why():
    graphed = _graphed_step(host_syncing_gpt().cuda())
    x, y = (t.cuda() for t in batches(1)[0])
    graphed(x, y)  # the eager warm-up step
    with pytest.raises(GraphCaptureError):
        graphed(x, y)
    # the broken-off capture left the CUDA generator usable: eager dropout and sampling draw again
    assert torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5).count_nonzero() < 64
    torch.randint(0, VOCAB, (2, 5), device="cuda")


@needs_gpu
def test_auto_falls_back_to_eager_steps_and_true_refuses_in_one_line():
    data = batches(8)
    eager, _, _ = fit(host_syncing_gpt, False, data, stateful=False)
    with pytest.warns(UserWarning, match="cannot be captured"):
        auto, _, captured = fit(host_syncing_gpt, "auto", data, stateful=False)
    assert not captured
    assert auto == pytest.approx(eager, rel=1e-5)
    with pytest.raises(ConfigError, match="perf.cuda_graphs=true: this model's step cannot be captured"):
        fit(host_syncing_gpt, True, data, stateful=False)


def test_mixture_of_experts_models_report_data_dependent_shapes():
    assert Jamba(
        VOCAB, d_model=32, n_layer=2, n_head=2, moe=MoEConfig(n_experts=2), attn_every=2, attn_offset=1
    ).has_data_dependent_shapes()
    assert not GPT(VOCAB, d_model=32, n_layer=1, n_head=2, block_size=8).has_data_dependent_shapes()
    assert not RecurrentLM(VOCAB, d_model=16, n_layer=1).has_data_dependent_shapes()


def test_a_setting_other_than_auto_true_or_false_is_refused():
    with pytest.raises(ValueError, match="perf.cuda_graphs must be auto, true or false"):
        Perf(cuda_graphs="yes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_asking_for_cuda_graphs_on_a_cpu_is_one_clear_error(tmp_path, small_corpus):
    cfg = compose_config([*tiny_overrides("gpt", small_corpus, steps=2), "perf.cuda_graphs=true"], tmp_path)
    with pytest.raises(ConfigError, match="perf.cuda_graphs=true cannot be used: training does not run on a CUDA GPU"):
        train(cfg)


@needs_gpu
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_generation_replays_one_captured_graph_per_run_with_the_eager_logits(kind):
    """stream_tokens on a GPU replays its one-token steps as a CUDA graph (generate/graphed.py): the
    logits of the eager cached step to fp32 rounding, past the context (eager re-reads between replays)."""
    from lmlab.generate import IncrementalDecoder, stream_tokens

    torch.manual_seed(0)
    sizes = dict(d_model=32, n_layer=2, n_head=4, dropout=0.0, block_size=16)
    model = (GPT(VOCAB, **sizes) if kind == "gpt" else Llama(VOCAB, n_kv_head=2, **sizes)).cuda().eval()
    prompt = torch.randint(0, VOCAB, (2, 5), device="cuda")
    plain, graphed = IncrementalDecoder(model, prompt), IncrementalDecoder(model, prompt, cuda_graph=True)
    for token in torch.randint(0, VOCAB, (40, 2), device="cuda"):
        torch.testing.assert_close(graphed.append(token), plain.append(token), atol=1e-4, rtol=1e-4)
    assert graphed.graphed.graph is not None and not graphed.graphed.eager  # captured, not fallen back
    greedy = [torch.stack(list(stream_tokens(model, prompt, 40, temperature=0, cuda_graph=g))) for g in (None, False)]
    torch.testing.assert_close(greedy[0], greedy[1], atol=0, rtol=0)
