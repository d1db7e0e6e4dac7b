"""The LightningDataModule: corpus -> byte splits -> tokenizer -> cached ids -> batches."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lmlab.data.cache import TokenizedCorpus, tokenize_with_cache
from lmlab.data.corpus import SPLITS, read_local_corpus, split_by_bytes
from lmlab.data.sampling import EpochSampler, ResumableDataLoader
from lmlab.data.windows import EvalWindows, StreamBatches, TrainWindows, already_batched
from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers import Tokenizer


class TextDataModule(pl.LightningDataModule):
    """A local UTF-8 file or folder as a language-modelling corpus.

    `stateful=True` lays every split out as `batch_size` contiguous streams in order, so recurrent
    models can carry their hidden state across batches; otherwise training windows are shuffled,
    in an order fixed by `seed` and the epoch so that a resumed run continues it exactly.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        path: str | None = None,
        name: str | None = None,
        *,
        block_size: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        splits: tuple[float, float, float] = (0.9, 0.05, 0.05),
        stateful: bool = False,
        num_workers: int = 0,
        cache_dir: str = ".cache/lmlab",
        seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value in (
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size or 1),
        ):
            if value < 1:
                raise ConfigError(f"data.{key} must be >= 1 (got {value}): set data.{key} to a positive integer")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (got {num_workers})")
        self.tokenizer = tokenizer
        self.path, self.block_size, self.batch_size = path, block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.splits, self.stateful = list(splits), stateful
        self.num_workers, self.cache_dir, self.seed = num_workers, cache_dir, seed
        self.name = name or (Path(path).stem if path else "corpus")
        self.corpus: TokenizedCorpus | None = None

    def read_corpus(self) -> str:
        if not self.path:
            raise ConfigError("data.path is not set: pass data.path=FILE_OR_FOLDER")
        return read_local_corpus(self.path)

    def prepare_data(self) -> None:
        if self.corpus is not None:
            return
        parts = split_by_bytes(self.read_corpus(), self.splits)
        self.corpus = tokenize_with_cache(self.name, parts, self.splits, self.tokenizer, self.cache_dir)
        self.tokenizer = self.corpus.tokenizer
        self._check_sizes()

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def _check_sizes(self) -> None:
        tokens = self.corpus.split_tokens
        needed = self.block_size + 1 if not self.stateful else self.batch_size * self.block_size + 1
        if tokens["train"] < needed:
            what = (
                f"one training window (data.block_size + 1 = {needed})"
                if not self.stateful
                else f"one stateful batch (data.batch_size x data.block_size + 1 = {needed})"
            )
            raise DataError(
                f"the train split has {tokens['train']} tokens, fewer than {what}: "
                "use a larger corpus or lower data.block_size" + (" / data.batch_size" if self.stateful else "")
            )
        for split in ("val", "test"):
            if tokens[split] == 0:
                raise DataError(
                    f"the {split} split has no tokens: use a larger corpus or a larger fraction in data.splits"
                )

    @cached_property
    def train_set(self):
        ids = self.corpus.ids["train"]
        return (
            StreamBatches(ids, self.batch_size, self.block_size)
            if self.stateful
            else TrainWindows(ids, self.block_size)
        )

    def eval_set(self, split: str):
        previous = self.corpus.ids[SPLITS[SPLITS.index(split) - 1]]
        context = int(previous[-1])
        ids = self.corpus.ids[split]
        if self.stateful:
            return StreamBatches(ids, self.eval_batch_size, self.block_size, context_token=context)
        return EvalWindows(ids, self.block_size, context_token=context)

    def _loader(self, dataset, *, batch_size: int | None, sampler: EpochSampler | None = None) -> DataLoader:
        batched = isinstance(dataset, TrainWindows)
        # Each loader draws its workers' base seed from its own generator: drawn from the global RNG,
        # it would make the dropout masks depend on how many loaders were started, so a resumed run
        # (whose iterators start at other moments) would not repeat the interrupted one exactly.
        options = dict(
            batch_size=None if isinstance(dataset, StreamBatches) else batch_size,
            drop_last=batched,
            collate_fn=already_batched if batched else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed),
        )
        if sampler is None:
            return DataLoader(dataset, **options)
        return ResumableDataLoader(dataset, sampler=sampler, **options)

    def train_dataloader(self) -> DataLoader:
        if len(self.train_set) < 1 or (not self.stateful and len(self.train_set) < self.batch_size):
            raise DataError(
                f"the train split holds {len(self.train_set)} windows of data.block_size={self.block_size}, "
                f"fewer than one batch (data.batch_size={self.batch_size}): lower data.batch_size or use a larger corpus"
            )
        sampler = EpochSampler(len(self.train_set), shuffle=not self.stateful, seed=self.seed)
        return self._loader(self.train_set, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set("val"), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set("test"), batch_size=self.eval_batch_size)

    @property
    def train_bytes_per_token(self) -> float:
        return self.corpus.split_bytes["train"] / max(1, self.corpus.split_tokens["train"])


class HFDataModule(TextDataModule):
    """A Hugging Face `datasets` corpus, by hub name or local path, its text column joined by newlines.

    A folder written by `Dataset.save_to_disk` loads with `load_from_disk`; anything else goes to
    `load_dataset` (hub names use the local cache first; set HF_DATASETS_OFFLINE=1 offline).
    The joined text is split by bytes like any other corpus, so scores stay comparable.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        path: str | None = None,
        name: str | None = None,
        *,
        config_name: str | None = None,
        split: str = "train",
        text_column: str = "text",
        **kwargs,
    ) -> None:
        super().__init__(tokenizer, path, name or (Path(path).name if path else None), **kwargs)
        self.config_name, self.split, self.text_column = config_name, split, text_column

    def read_corpus(self) -> str:
        import datasets

        if not self.path:
            raise ConfigError("data.path is not set: pass data.path=DATASET_NAME_OR_FOLDER")
        try:
            local = Path(self.path).expanduser()
            if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
                loaded = datasets.load_from_disk(str(local))
                table = loaded[self.split] if isinstance(loaded, datasets.DatasetDict) else loaded
            else:
                table = datasets.load_dataset(self.path, self.config_name, split=self.split)
        except Exception as err:  # datasets raises many types; all mean "cannot load this corpus"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(
                f"could not load Hugging Face dataset '{self.path}' (split '{self.split}'): {reason}; "
                "check data.path/data.split, or set HF_DATASETS_OFFLINE=1 to use the local cache"
            ) from None
        if self.text_column not in table.column_names:
            raise DataError(
                f"dataset '{self.path}' has no column '{self.text_column}' (columns: {table.column_names}): "
                "set data.text_column"
            )
        text = "\n".join(t for t in table[self.text_column] if t)
        if not text.strip():
            raise DataError(f"dataset '{self.path}' has no text in column '{self.text_column}'")
        return text
