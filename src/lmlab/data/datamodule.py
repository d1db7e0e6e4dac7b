"""The LightningDataModule: corpus -> byte splits -> tokenizer -> cached ids -> batches."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lmlab.data.cache import TokenizedCorpus
from lmlab.data.corpus import SPLITS
from lmlab.data.eval_context import EvalProtocol
from lmlab.data.hf_text import dataset_text
from lmlab.data.prepare import prepare_corpus
from lmlab.data.sampling import EpochSampler, ResumableDataLoader, WindowSampler, check_sampling_mode
from lmlab.data.sources import CorpusSource, check_split_names, local_source
from lmlab.data.windows import EvalWindows, StreamBatches, TrainWindows, already_batched, shard_rows
from lmlab.errors import ConfigError, DataError
from lmlab.lightning_compat import uses_distributed_sampler
from lmlab.tokenizers import Tokenizer


class TextDataModule(pl.LightningDataModule):
    """A local UTF-8 file or folder as a language-modelling corpus (see `lmlab.data.sources`):
    one text cut by `splits`, or its own split files (`train`/`val`/`test`, or a folder of them).

    `stateful=True` lays every split out as contiguous streams read in order, so recurrent models
    can carry their hidden state across batches; otherwise training windows are drawn as `sampling`
    says (`lmlab.data.sampling`), in an order fixed by `seed` and the epoch so that a resumed run
    continues it exactly.

    `batch_size` is per process (Lightning's convention): under DDP a step trains on world_size x
    batch_size rows, and each rank cuts its own share of the data (Lightning's distributed sampler
    must be off, `trainer.use_distributed_sampler=false`). Evaluation scores every token exactly once
    whatever the number of processes; stateful evaluation always uses `eval_batch_size` streams in
    all, split between the ranks, so its score does not depend on the process count either.
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
        splits: tuple[float, float, float] | None = None,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        glob: str | None = None,
        stateful: bool = False,
        sampling: str = "epoch",
        num_workers: int = 0,
        cache_dir: str = ".cache/lmlab",
        seed: int = 0,
        eval_context: str | None = None,
        eval_stride: int | None = None,
    ) -> None:
        super().__init__()
        for key, value in (
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size or 1),
        ):
            if value < 1:
                raise ConfigError(f"data.{key} must be >= 1 (got {value}): set data.{key} to a positive integer")
        if check_sampling_mode(sampling) != "epoch" and stateful:
            raise ConfigError(
                f"data.sampling={sampling} does not apply to data.stateful=true (its streams are read in order): "
                "set data.sampling=epoch or data.stateful=false"
            )
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (got {num_workers})")
        self.tokenizer = tokenizer
        self.path, self.block_size, self.batch_size = path, block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.splits, self.stateful, self.sampling = None if splits is None else list(splits), stateful, sampling
        self.split_paths, self.glob = {"train": train, "val": val, "test": test}, glob
        self.num_workers, self.cache_dir, self.seed = num_workers, cache_dir, seed
        # how validation and test score each token: eval.context as resolved for the model
        # (lmlab.data.eval_context), by default as training reads the text
        self.eval_protocol = EvalProtocol(eval_context or ("carry" if stateful else "window"), eval_stride)
        self.name = name or (Path(path).stem if path else Path(train).parent.name if train else "corpus")
        self.corpus: TokenizedCorpus | None = None

    def corpus_source(self) -> CorpusSource:
        """Where the text is: resolved (files listed, splits recognised) but not read."""
        return local_source(self.path, **self.split_paths, glob=self.glob, splits=self.splits)

    def prepare_data(self) -> None:
        if self.corpus is not None:
            return
        source = self.corpus_source()
        self.predefined_splits = source.predefined
        self.corpus = prepare_corpus(source, self.tokenizer, self.cache_dir, self.name)
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
                fix = (
                    "give it more text"
                    if self.predefined_splits
                    else "use a larger corpus or a larger fraction in data.splits"
                )
                raise DataError(f"the {split} split has no tokens: {fix}")

    def _shard(self) -> tuple[int, int]:
        """(rank, world size) of this process, by which the loaders cut their data."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        if uses_distributed_sampler(trainer):  # on, Lightning would re-shard lmlab's shards
            raise ConfigError(
                "lmlab shards the data by rank itself, so Lightning's distributed sampler would score tokens "
                "twice and break stateful streams: set trainer.use_distributed_sampler=false"
            )
        return trainer.global_rank, trainer.world_size

    def train_set(self, rank: int = 0, world_size: int = 1) -> TrainWindows | StreamBatches:
        """The training windows (a sampler picks which), or this rank's `batch_size` of the
        world_size x batch_size streams a stateful run reads."""
        ids = self.corpus.ids["train"]
        if not self.stateful:
            return TrainWindows(ids, self.block_size)
        rows = range(rank * self.batch_size, (rank + 1) * self.batch_size)
        return StreamBatches(ids, self.batch_size * world_size, self.block_size, rows=rows)

    @property
    def eval_streams(self) -> bool:
        """Evaluation reads contiguous streams carrying the model's state (eval.context=carry)."""
        return self.eval_protocol.carries_state

    def eval_set(self, split: str, rank: int = 0, world_size: int = 1) -> EvalWindows | StreamBatches:
        """This rank's share of a full pass over `split`: windows (of `eval.stride` new targets when
        sliding), or some of `eval_batch_size` streams that carry the model's state."""
        previous = self.corpus.ids[SPLITS[SPLITS.index(split) - 1]]
        context = int(previous[-1])
        ids = self.corpus.ids[split]
        if not self.eval_streams:
            return EvalWindows(
                ids, self.block_size, context, rank=rank, world_size=world_size, stride=self.eval_protocol.stride
            )
        if self.eval_batch_size < world_size:
            raise ConfigError(
                f"stateful evaluation reads data.eval_batch_size={self.eval_batch_size} streams in all, "
                f"which leaves some of the {world_size} processes without rows: "
                f"set data.eval_batch_size to {world_size} or more (a multiple of {world_size} balances them)"
            )
        rows = shard_rows(self.eval_batch_size, rank, world_size)
        return StreamBatches(ids, self.eval_batch_size, self.block_size, context_token=context, rows=rows)

    def _loader(self, dataset, *, batch_size: int | None, sampler: EpochSampler | None = None) -> DataLoader:
        batched = isinstance(dataset, (TrainWindows, EvalWindows))  # these gather whole batches themselves
        # Each loader draws its workers' base seed from its own generator: drawn from the global RNG,
        # it would make the dropout masks depend on how many loaders were started, so a resumed run
        # (whose iterators start at other moments) would not repeat the interrupted one exactly.
        options = dict(
            batch_size=None if isinstance(dataset, StreamBatches) else batch_size,
            drop_last=isinstance(dataset, TrainWindows),
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
        rank, world_size = self._shard()
        dataset = self.train_set(rank, world_size)
        processes = f" on each of {world_size} processes" if world_size > 1 else ""
        if self.stateful:
            if len(dataset) < 1:
                raise DataError(
                    f"the train split has {self.corpus.split_tokens['train']} tokens, too few for "
                    f"{world_size * self.batch_size} streams (data.batch_size={self.batch_size}{processes}) "
                    f"of one data.block_size={self.block_size} window each: lower data.batch_size or "
                    "data.block_size" + (", or use fewer processes" if world_size > 1 else "")
                )
            sampler = EpochSampler(len(dataset), shuffle=False, seed=self.seed)
        else:
            sampler = WindowSampler(
                len(dataset.ids), self.block_size, mode=self.sampling, seed=self.seed, rank=rank, world_size=world_size
            )
            if len(sampler) < self.batch_size:
                raise DataError(
                    f"the train split holds {sampler.count} windows of data.block_size={self.block_size}, "
                    f"fewer than one batch (data.batch_size={self.batch_size}{processes}): "
                    "lower data.batch_size or use a larger corpus"
                )
        return self._loader(dataset, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set("val", *self._shard()), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set("test", *self._shard()), batch_size=self.eval_batch_size)

    @property
    def train_bytes_per_token(self) -> float:
        return self.corpus.split_bytes["train"] / max(1, self.corpus.split_tokens["train"])


class HFDataModule(TextDataModule):
    """A Hugging Face `datasets` corpus, by hub name or local path, its text column joined by newlines.

    A folder written by `Dataset.save_to_disk` loads with `load_from_disk`; anything else goes to
    `load_dataset` (hub names use the local cache first; set HF_DATASETS_OFFLINE=1 offline).
    `split` is cut by bytes like any other corpus; or `train`/`val`/`test` name the dataset's own
    splits (e.g. train, validation, test). `streaming=True` reads the rows without downloading the
    dataset first. Each split's text is written once into the cache (`lmlab.data.hf_text`).
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
        streaming: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(tokenizer, path, name or (Path(path).name if path else None), **kwargs)
        self.config_name, self.split, self.text_column, self.streaming = config_name, split, text_column, streaming

    def corpus_source(self) -> CorpusSource:
        if not self.path:
            raise ConfigError("data.path is not set: pass data.path=DATASET_NAME_OR_FOLDER")
        if self.glob:
            raise ConfigError(f"data.glob={self.glob!r} selects files of a folder, not rows of a dataset: drop it")
        named = check_split_names(None, self.split_paths, self.splits)
        wanted = self.split_paths if named else {"all": self.split}
        text = partial(dataset_text, self.path, self.config_name, text_column=self.text_column)
        files = {
            role: str(text(split, streaming=self.streaming, cache_dir=self.cache_dir)) for role, split in wanted.items()
        }
        if named:
            return local_source(**files)
        return local_source(files["all"], splits=self.splits)
