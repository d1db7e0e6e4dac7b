"""DDP on 2 CPU processes (gloo) gives the numbers one process gives.

Both processes are started here with torch.multiprocessing and told their rank through LOCAL_RANK,
so Lightning's `ddp` strategy joins them instead of relaunching the test command. Each runs the
same three checks as the single process in the test: validation and test bits per byte of a GPT
(an odd number of 61-token windows, so a naive shard would pad with a duplicate), three stateful
LSTM steps (2 rows per rank against 4 rows on one process), and stateful validation.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmlab import lightning_compat
from lmlab.data import TextDataModule
from lmlab.models import GPT, RecurrentLM
from lmlab.run.distributed import SameStreamDDPStrategy
from lmlab.task import LanguageModelTask
from lmlab.tokenizers import CharTokenizer
from tests.helpers import cpu_trainer

REPO = Path(__file__).resolve().parents[1]
ROWS = 4  # stateful training rows in all: ROWS // world_size per rank


class BatchRecorder(pl.Callback):
    """Keeps every training batch this process received, in order."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.batches.append((batch[0].clone(), batch[1].clone()))


def _datamodule(corpus: Path, **kwargs) -> TextDataModule:
    module = TextDataModule(CharTokenizer(), str(corpus), cache_dir=str(corpus.parent / "cache"), seed=5, **kwargs)
    module.prepare_data()
    return module


def _task(model: torch.nn.Module, stateful: bool = False) -> LanguageModelTask:
    return LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=1e-2), stateful=stateful)


def _score(devices: int, stage: str, task: LanguageModelTask, data: TextDataModule) -> float:
    """val/bpb or test/bpb of one full pass (`stage`: validate or test), as this process sees it."""
    trainer = cpu_trainer(devices)
    getattr(trainer, stage)(task, datamodule=data, verbose=False)
    return float(trainer.callback_metrics[("val" if stage == "validate" else "test") + "/bpb"])


def _run_checks(devices: int, corpus: Path) -> dict:
    """What the test compares between 1 and 2 processes."""
    results = {}
    data = _datamodule(corpus, block_size=61, batch_size=4, eval_batch_size=4)
    torch.manual_seed(0)
    gpt = _task(GPT(data.tokenizer.vocab_size, d_model=16, n_layer=1, n_head=2, block_size=61))
    results["val/bpb"] = _score(devices, "validate", gpt, data)
    results["test/bpb"] = _score(devices, "test", gpt, data)

    data = _datamodule(corpus, block_size=16, batch_size=ROWS // devices, eval_batch_size=3, stateful=True)
    torch.manual_seed(0)
    lstm = _task(RecurrentLM(data.tokenizer.vocab_size, cell="lstm", d_model=16, n_layer=1, dropout=0.0), True)
    results["initial"] = {k: v.detach().clone() for k, v in lstm.model.state_dict().items()}
    recorder = BatchRecorder()
    cpu_trainer(devices, [recorder], max_steps=3, limit_val_batches=0).fit(lstm, datamodule=data)
    results["batches"] = recorder.batches
    results["weights"] = {k: v.detach().clone() for k, v in lstm.model.state_dict().items()}
    results["stateful val/bpb"] = _score(devices, "validate", lstm, data)
    if devices > 1:
        results["resumed vs straight"] = _resume_difference(devices, corpus)
    return results


class SaveAt(pl.Callback):
    """Writes a checkpoint once training reaches `step` (a collective call, as Lightning's own saves are)."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _resume_difference(devices: int, corpus: Path) -> float:
    """Largest weight difference between 4 stateful steps straight and 2 steps, a checkpoint, 2 more."""

    def build() -> tuple[TextDataModule, LanguageModelTask]:
        data = _datamodule(corpus, block_size=16, batch_size=ROWS // devices, eval_batch_size=2, stateful=True)
        torch.manual_seed(0)
        model = RecurrentLM(data.tokenizer.vocab_size, cell="lstm", d_model=16, n_layer=1, dropout=0.0)
        return data, _task(model, True)

    middle = corpus.parent / "middle.ckpt"
    data, task = build()
    cpu_trainer(devices, [SaveAt(middle, 2)], max_steps=4, limit_val_batches=0).fit(task, datamodule=data)
    straight = {k: v.clone() for k, v in task.model.state_dict().items()}
    data, task = build()
    cpu_trainer(devices, max_steps=4, limit_val_batches=0).fit(
        task, datamodule=data, ckpt_path=middle, weights_only=False
    )
    return max((task.model.state_dict()[k] - v).abs().max().item() for k, v in straight.items())


def _rank_main(rank: int, port: int, corpus: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    try:
        torch.save(_run_checks(2, corpus), corpus.parent / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory) -> tuple[dict, list[dict], TextDataModule]:
    corpus = tmp_path_factory.mktemp("ddp") / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:30_000])
    torch.set_num_threads(1)
    single = _run_checks(1, corpus)  # also fills the token cache the two processes then read
    mp.spawn(_rank_main, args=(_free_port(), corpus), nprocs=2, join=True)
    ranks = [torch.load(corpus.parent / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return single, ranks, _datamodule(corpus, block_size=61)


def test_distributed_evaluation_scores_every_token_once(one_and_two_processes):
    single, ranks, data = one_and_two_processes
    windows = -(-data.corpus.split_tokens["val"] // 61)
    assert windows % 2 == 1  # the case a distributed sampler pads with a duplicate window
    for key in ("val/bpb", "test/bpb", "stateful val/bpb"):
        assert ranks[0][key] == ranks[1][key]  # every rank reports the all-reduced score
        assert abs(ranks[0][key] - single[key]) < 1e-6, key


def test_stateful_ranks_read_their_own_contiguous_streams(one_and_two_processes):
    single, ranks, _ = one_and_two_processes
    for rank in ranks:
        assert len(rank["batches"]) == 3 and rank["batches"][0][0].shape == (ROWS // 2, 16)
        for (_, y0), (x1, _) in zip(rank["batches"], rank["batches"][1:], strict=False):
            assert torch.equal(x1[:, 0], y0[:, -1])  # row i of batch k+1 continues row i of batch k
    for step, (x, y) in enumerate(single["batches"]):  # rank r holds rows 2r, 2r+1 of the one-process layout
        assert torch.equal(torch.cat([rank["batches"][step][0] for rank in ranks]), x)
        assert torch.equal(torch.cat([rank["batches"][step][1] for rank in ranks]), y)


def test_stateful_training_on_two_processes_matches_one_with_twice_the_rows(one_and_two_processes):
    single, ranks, _ = one_and_two_processes
    moved = 0.0
    for name, weight in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])  # DDP keeps the replicas equal
        np.testing.assert_allclose(ranks[0]["weights"][name].numpy(), weight.numpy(), atol=1e-5, err_msg=name)
        moved = max(moved, (weight - single["initial"][name]).abs().max().item())
    assert moved > 1e-3  # three AdamW steps at lr 1e-2 moved the weights: the match is not trivial


def test_a_stateful_ddp_run_resumes_exactly(one_and_two_processes):
    _, ranks, _ = one_and_two_processes
    assert [rank["resumed vs straight"] for rank in ranks] == [0.0, 0.0]  # every rank resumes its own streams


def test_ddp_is_built_on_the_stream_that_trains(monkeypatch):
    """DDP keeps each parameter's gradient-accumulation node on the stream it was built on: built on a
    side stream (Lightning 2.6's DDPStrategy), every backward hands every gradient across streams."""
    built = []

    def no_side_stream(*args, **kwargs):
        pytest.fail("DDP was built on a new CUDA stream")

    monkeypatch.setattr(torch.cuda, "Stream", no_side_stream)
    monkeypatch.setattr(
        lightning_compat, "DistributedDataParallel", lambda module, device_ids, **kw: built.append(kw) or module
    )
    strategy = SameStreamDDPStrategy(gradient_as_bucket_view=True)
    monkeypatch.setattr(strategy, "determine_ddp_device_ids", lambda: [0])  # as on a GPU
    model = torch.nn.Linear(2, 2)
    assert strategy._setup_model(model) is model
    assert built == [{"gradient_as_bucket_view": True}]
