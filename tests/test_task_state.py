"""The task carries a recurrent model's state from batch to batch, in training and in evaluation.

Compared exactly against a hand-written stream over the same batches: a task that dropped the state
(or reset it at every batch) would score the first positions of every batch differently.
"""

from __future__ import annotations

import copy
from functools import partial
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from lmlab.callbacks import ExactResume
from lmlab.errors import ConfigError
from lmlab.models import RecurrentLM, detach_state
from lmlab.task import LanguageModelTask

VOCAB, BATCH, BLOCK, STEPS = 13, 2, 5, 4


def _stream() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows of one token stream per row, as a stateful loader yields them."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, STEPS * BLOCK + 1), generator=g)
    return [(tokens[:, i : i + BLOCK], tokens[:, i + 1 : i + BLOCK + 1]) for i in range(0, STEPS * BLOCK, BLOCK)]


def _model() -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(VOCAB, cell="lstm", d_model=16, n_layer=1, dropout=0.0)


def _manual_nats(model: RecurrentLM, batches, carry: bool) -> list[torch.Tensor]:
    state, out = None, []
    for x, y in batches:
        logits, new_state = model(x, state if carry else None)
        out.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        state = detach_state(new_state)
    return out


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())


def test_training_carries_the_state_across_batches():
    batches, model = _stream(), _model()
    reference = copy.deepcopy(model)
    task = LanguageModelTask(model, optimizer=partial(torch.optim.SGD, lr=0.5), stateful=True)
    seen = _Losses()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[seen],
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))

    optimizer, state, expected = torch.optim.SGD(reference.parameters(), lr=0.5), None, []
    for x, y in batches:  # the same updates by hand, the state carried and detached between batches
        logits, state = reference(x, state)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state = detach_state(state)
        expected.append(loss.detach())
    torch.testing.assert_close(torch.stack(seen.losses), torch.stack(expected), rtol=1e-6, atol=0)
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_evaluation_carries_the_state_across_batches():
    batches, model = _stream(), _model().eval()
    task = LanguageModelTask(model, optimizer=torch.optim.SGD, stateful=True)
    task._eval_epoch_start()
    per_batch = []
    with torch.no_grad():
        for batch in batches:
            before = task.eval_nats.compute().clone()
            task._eval_step(batch)
            per_batch.append(task.eval_nats.compute() - before)
        carried, dropped = _manual_nats(model, batches, carry=True), _manual_nats(model, batches, carry=False)
    torch.testing.assert_close(torch.stack(per_batch).double(), torch.stack(carried).double(), rtol=1e-5, atol=0)
    # the check can tell the two apart: without the state, every batch after the first scores differently
    assert all((a - b).abs() > 1e-4 for a, b in zip(carried[1:], dropped[1:]))


def test_exact_resume_restores_the_carried_state_and_the_random_stream():
    """ExactResume keeps what Lightning does not: the state carried into the next batch and the RNG
    that draws the next dropout masks, put back when training starts (after Lightning's own draws)."""
    one_process = SimpleNamespace(world_size=1, global_rank=0)
    task = LanguageModelTask(_model(), optimizer=torch.optim.SGD, stateful=True)
    task.carried_state = _model().init_state(BATCH, "cpu")
    task.carried_state = tuple(torch.randn_like(t) for t in task.carried_state)
    checkpoint: dict = {}
    torch.manual_seed(5)
    ExactResume().on_save_checkpoint(one_process, task, checkpoint)
    next_draws = torch.rand(4)

    resumed, callback = LanguageModelTask(_model(), optimizer=torch.optim.SGD, stateful=True), ExactResume()
    callback.on_load_checkpoint(one_process, resumed, checkpoint)
    torch.manual_seed(0)  # Lightning's setup draws from the RNG before training starts
    callback.on_train_start(one_process, resumed)
    assert torch.equal(torch.rand(4), next_draws)
    for restored, saved in zip(resumed.carried_state, task.carried_state):
        assert torch.equal(restored, saved)


def test_a_stateful_checkpoint_of_n_processes_names_the_devices_to_resume_with():
    checkpoint = {"carried_state": None, "carried_state_by_rank": [None, None], "rng_states": None}
    task = LanguageModelTask(_model(), optimizer=torch.optim.SGD, stateful=True)
    with pytest.raises(ConfigError, match="saved by 2 processes: resume it with trainer.devices=2"):
        ExactResume().on_load_checkpoint(SimpleNamespace(world_size=1, global_rank=0), task, checkpoint)
