"""Recurrent language models (Elman RNN, GRU, LSTM) in the Zaremba et al. (2014) recipe."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmlab.models.base import LanguageModel, check_choice, check_dropout, check_sizes, padded_vocab_size
from lmlab.models.state import State

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentLM(LanguageModel):
    """Embedding -> dropout -> stacked RNN/GRU/LSTM -> dropout -> linear to the vocabulary.

    The whole sequence goes through one nn.RNN/GRU/LSTM call (cuDNN on GPU), never a Python
    loop over time. The state is the final hidden state (a Tensor, or an (h, c) tuple for the
    LSTM), returned so truncated BPTT can carry it into the next batch. No context limit.

    Dropout sits on the non-recurrent connections only (embedding -> first layer, between layers,
    last layer -> output), never on the hidden-to-hidden path, as in Zaremba et al. (2014).
    `init_range=None` draws the embedding and output weights from U(-0.1, 0.1) and leaves the cells
    at PyTorch's U(-1/sqrt(d), 1/sqrt(d)); a number r draws every parameter from U(-r, r), the
    paper's recipe (0.05 for the medium model). `cell` picks the family (rnn, gru, lstm); the other
    defaults are model=rnn's, model=gru's and model=lstm's.
    """

    carries_state = True

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        d_model: int = 256,
        n_layer: int = 2,
        dropout: float = 0.2,
        tie_weights: bool = True,
        pad_vocab_to: int = 1,
        init_range: float | None = None,
    ) -> None:
        super().__init__()
        check_sizes(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, pad_vocab_to=pad_vocab_to)
        check_dropout(dropout)
        check_choice("cell", cell, tuple(CELLS))
        if init_range is not None and init_range <= 0:
            raise ValueError(
                f"init_range must be > 0 (got {init_range}): set model.init_range to e.g. 0.05, or null for the default"
            )
        self.vocab_size = vocab_size
        self.context_length = None
        self.cell = cell
        self.d_model = d_model
        self.n_layer = n_layer

        n_rows = padded_vocab_size(vocab_size, pad_vocab_to)
        self.wte = nn.Embedding(n_rows, d_model)
        self.drop = nn.Dropout(dropout)
        # torch applies this dropout between layers only, and warns when there is one layer
        between = dropout if n_layer > 1 else 0.0
        self.rnn = CELLS[cell](d_model, d_model, num_layers=n_layer, dropout=between, batch_first=True)
        self.lm_head = nn.Linear(d_model, n_rows)

        if init_range is None:  # PyTorch's word_language_model example
            nn.init.uniform_(self.wte.weight, -0.1, 0.1)
            nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
            nn.init.zeros_(self.lm_head.bias)
        else:  # Zaremba et al.: every parameter, biases included
            for weight in self.parameters():
                nn.init.uniform_(weight, -init_range, init_range)
        if tie_weights:  # Press & Wolf (2017): input and output embeddings share one matrix
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        x = self.drop(self.wte(idx))
        x, state = self.rnn(x, state)  # state=None: torch starts from zeros
        logits = self.lm_head(self.drop(x))
        return self._unpad(logits), state

    def init_state(self, batch_size: int, device: torch.device | str) -> State:
        h = torch.zeros(self.n_layer, batch_size, self.d_model, device=device, dtype=self.wte.weight.dtype)
        return (h, torch.zeros_like(h)) if self.cell == "lstm" else h
