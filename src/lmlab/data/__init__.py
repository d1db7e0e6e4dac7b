"""Corpora, byte-level splits, the token cache and batching."""

from lmlab.data.datamodule import HFDataModule, TextDataModule
from lmlab.data.windows import IGNORE_INDEX

__all__ = ["HFDataModule", "IGNORE_INDEX", "TextDataModule"]
