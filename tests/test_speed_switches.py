"""The speed switches change how fast a run goes, never what it computes."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lmlab.models import GPT
from lmlab.task import LanguageModelTask


def _losses(compile: bool) -> list[float]:
    torch.manual_seed(0)
    model = GPT(vocab_size=37, d_model=32, n_layer=2, n_head=2, block_size=16)
    task = LanguageModelTask(model, optimizer=partial(torch.optim.AdamW, lr=1e-2), compile=compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        seq = torch.randint(0, 37, (4, 17), generator=g)
        loss = task._step_loss(seq[:, :-1], seq[:, 1:], training=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_compiled_training_matches_eager():
    assert _losses(compile=True) == pytest.approx(_losses(compile=False), rel=1e-4)


def test_vocab_padding_leaves_the_probabilities_unchanged():
    torch.manual_seed(0)
    plain = GPT(vocab_size=37, d_model=32, n_layer=2, n_head=2, block_size=16)
    padded = GPT(vocab_size=37, d_model=32, n_layer=2, n_head=2, block_size=16, pad_vocab_to=64)
    with torch.no_grad():
        for name, param in padded.named_parameters():
            source = dict(plain.named_parameters())[name]
            param.zero_()
            param[tuple(slice(0, n) for n in source.shape)] = source  # padding rows start at zero
    idx = torch.randint(0, 37, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, _ = padded(idx)
    assert logits.shape[-1] == 37
    assert torch.allclose(logits.softmax(-1), plain(idx)[0].softmax(-1), atol=1e-6)
