"""Corpora, byte-level splits, the token cache and batching."""

from lmlab.data.datamodule import HFDataModule, TextDataModule
from lmlab.data.windows import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "HFDataModule", "TextDataModule"]
