"""Bits per byte, checked against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lmlab.data import TextDataModule
from lmlab.data.windows import IGNORE_INDEX
from lmlab.metrics import token_nats
from lmlab.models import LanguageModel
from lmlab.optim import parameter_groups
from lmlab.task import LanguageModelTask
from lmlab.tokenizers import BPETokenizer, CharTokenizer


class FixedDistribution(LanguageModel):
    """Predicts the same distribution at every position, whatever the context."""

    context_length = None

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size = len(logits)
        self.logits = nn.Parameter(logits.clone())

    def forward(self, idx, state=None):
        return self.logits.expand(*idx.shape, -1), state

    def init_state(self, batch_size, device):
        return None


@pytest.mark.parametrize("tokenizer", [CharTokenizer, lambda: BPETokenizer(vocab_size=300)])
@pytest.mark.parametrize("stateful", [False, True])
def test_bits_per_byte_matches_a_hand_computation(tmp_path, small_corpus, tokenizer, stateful):
    dm = TextDataModule(
        tokenizer(), str(small_corpus), cache_dir=str(tmp_path), block_size=16, batch_size=4, stateful=stateful
    )
    dm.prepare_data()
    vocab = dm.tokenizer.vocab_size
    logits = torch.linspace(-2, 2, vocab)
    task = LanguageModelTask(FixedDistribution(logits), optimizer=torch.optim.SGD)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.validate(task, datamodule=dm, verbose=False)
    got = {key: float(value) for key, value in trainer.callback_metrics.items()}

    log_probs = torch.log_softmax(logits.double(), -1).numpy()
    val_ids = np.asarray(dm.corpus.ids["val"], dtype=np.int64)
    nats = -log_probs[val_ids].sum()  # every val token is scored once, the first from the train split's last
    val_bytes = len(small_corpus.read_bytes()) - dm.corpus.split_bytes["train"] - dm.corpus.split_bytes["test"]
    assert got["val/bpb"] == pytest.approx(nats / math.log(2) / val_bytes, rel=1e-5)
    assert got["val/loss"] == pytest.approx(nats / len(val_ids), rel=1e-5)
    assert got["val/ppl"] == pytest.approx(math.exp(nats / len(val_ids)), rel=1e-4)


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_the_plain_one(reduction, dtype):
    """Scoring rows in checkpointed fp32 chunks gives the loss and gradients of one full fp32 pass."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 11, generator=g)).to(dtype)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[0, :2] = IGNORE_INDEX  # padding stays free in every chunk
    results = []
    for chunk_rows in (0, 4):  # 21 rows: chunks of 4, 4, 4, 4, 4, 1
        leaf = logits.clone().requires_grad_()
        loss = token_nats(leaf, targets, label_smoothing=0.1, reduction=reduction, chunk_rows=chunk_rows)
        loss.sum().backward()
        results.append((loss.detach(), leaf.grad))
    (plain, plain_grad), (chunked, chunked_grad) = results
    assert chunked.dtype == torch.float32 and chunked.shape == plain.shape
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked_grad, plain_grad)
