"""Corpus reading, byte splits, the token cache and batching."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from lmlab.data import HFDataModule, TextDataModule
from lmlab.data.corpus import split_by_bytes
from lmlab.data.sources import read_local_corpus
from lmlab.data.windows import IGNORE_INDEX, EvalWindows, StreamBatches
from lmlab.errors import DataError
from lmlab.tokenizers import BPETokenizer, CharTokenizer


def test_split_by_bytes_keeps_all_text_and_cuts_at_line_breaks():
    text = "".join(f"line {i} — naïve\n" for i in range(1000))
    parts = split_by_bytes(text, [0.9, 0.05, 0.05])
    assert "".join(parts.values()) == text
    assert parts["train"].endswith("\n") and parts["val"].endswith("\n")
    sizes = {k: len(v.encode()) / len(text.encode()) for k, v in parts.items()}
    assert sizes["train"] == pytest.approx(0.9, abs=0.01) and sizes["val"] == pytest.approx(0.05, abs=0.01)


def test_split_never_cuts_a_multibyte_character():
    text = "日本語" * 400  # no line breaks at all
    parts = split_by_bytes(text, [0.8, 0.1, 0.1])
    assert "".join(parts.values()) == text


@pytest.mark.parametrize("fractions", [[0.5, 0.5], [0.9, 0.2, -0.1], [0.5, 0.3, 0.3]])
def test_bad_split_fractions_are_rejected(fractions):
    with pytest.raises(DataError, match="data.splits"):
        split_by_bytes("some text\n" * 100, fractions)


def test_tiny_corpus_has_an_empty_split():
    with pytest.raises(DataError, match="split is empty"):
        split_by_bytes("ab", [0.9, 0.05, 0.05])


def test_corpus_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_local_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        read_local_corpus(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf" + "é".encode("latin-1") + b" au lait")
    with pytest.raises(DataError, match="byte offset 3"):
        read_local_corpus(tmp_path / "latin1.txt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="no text files"):
        read_local_corpus(tmp_path / "folder")


def test_folder_corpus_joins_text_files_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert read_local_corpus(tmp_path) == "first\nsecond"


def test_eval_windows_score_every_token_exactly_once():
    ids = np.arange(1, 30, dtype=np.uint16)  # 29 tokens
    data = EvalWindows(ids, block_size=8, context_token=99)
    xs = torch.stack([data[i][0] for i in range(len(data))]).flatten()
    ys = torch.stack([data[i][1] for i in range(len(data))]).flatten()
    targets = ys[ys != IGNORE_INDEX]
    assert targets.tolist() == ids.tolist()
    assert xs[0] == 99  # the first token is predicted from the previous split's last token
    assert torch.equal(xs[1:29], ys[:28])


def test_stream_batches_continue_each_row_from_one_batch_to_the_next():
    ids = np.arange(200, dtype=np.uint16)
    data = StreamBatches(ids, batch_size=4, block_size=5)
    x0, y0 = data[0]
    x1, _ = data[1]
    assert x0.shape == (4, 5)
    assert torch.equal(x1[:, 0], y0[:, -1])  # row r of batch k+1 picks up where batch k left off
    evaluated = StreamBatches(ids, batch_size=4, block_size=5, context_token=7)
    targets = torch.cat([evaluated[k][1] for k in range(len(evaluated))], dim=1)
    assert sorted(targets[targets != IGNORE_INDEX].tolist()) == ids.tolist()


def test_second_run_reuses_the_token_cache(tmp_path, small_corpus, monkeypatch):
    first = TextDataModule(BPETokenizer(vocab_size=300), str(small_corpus), cache_dir=str(tmp_path), block_size=16)
    first.prepare_data()

    def refuse(*_):
        raise AssertionError("tokenizer retrained although the cache holds this corpus")

    fresh = BPETokenizer(vocab_size=300)
    monkeypatch.setattr(fresh, "train", refuse)
    second = TextDataModule(fresh, str(small_corpus), cache_dir=str(tmp_path), block_size=16)
    second.prepare_data()
    assert np.array_equal(np.asarray(first.corpus.ids["val"]), np.asarray(second.corpus.ids["val"]))
    assert second.tokenizer.vocab_size == first.tokenizer.vocab_size
    other = TextDataModule(BPETokenizer(vocab_size=400), str(small_corpus), cache_dir=str(tmp_path), block_size=16)
    other.prepare_data()
    assert other.corpus.path != first.corpus.path


def test_every_tokenizer_sees_the_same_split_bytes(tmp_path, small_corpus):
    sizes = []
    for tokenizer in (CharTokenizer(), BPETokenizer(vocab_size=300)):
        dm = TextDataModule(tokenizer, str(small_corpus), cache_dir=str(tmp_path), block_size=16)
        dm.prepare_data()
        sizes.append(dm.corpus.split_bytes)
    assert sizes[0] == sizes[1]
    assert sum(sizes[0].values()) == small_corpus.stat().st_size


def test_corpus_smaller_than_one_window_is_refused(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("to be or not to be\n" * 5)
    dm = TextDataModule(CharTokenizer(), str(corpus), cache_dir=str(tmp_path / "c"), block_size=512)
    with pytest.raises(DataError, match="fewer than one training window"):
        dm.prepare_data()


def test_hugging_face_dataset_saved_to_disk_loads_offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lines = [f"line {i}: to be or not to be" for i in range(400)] + ["", None]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": lines, "id": list(range(len(lines)))})}
    ).save_to_disk(str(tmp_path / "ds"))
    dm = HFDataModule(CharTokenizer(), str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"), block_size=16)
    (text,) = dm.corpus_source().texts["all"].files
    assert text.read_text() == "\n".join(lines[:400])  # empty and missing rows dropped
    dm.prepare_data()
    assert dm.name == "ds" and sum(dm.corpus.split_bytes.values()) == text.stat().st_size


def test_hugging_face_dataset_errors_are_one_line(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets.Dataset.from_dict({"body": ["some text"] * 10}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="no column 'text'.*data.text_column"):
        HFDataModule(CharTokenizer(), str(tmp_path / "ds"), cache_dir=str(tmp_path / "c")).corpus_source()
    with pytest.raises(DataError, match="could not load Hugging Face dataset") as err:
        HFDataModule(CharTokenizer(), str(tmp_path / "no-such-dataset"), cache_dir=str(tmp_path / "c")).corpus_source()
    assert "\n" not in str(err.value)


def test_a_cache_entry_is_read_through_once_and_again_after_a_write(tmp_path, small_corpus, monkeypatch):
    """Every id is checked against the vocabulary the first time; later starts trust the files' stamps
    (a 4 GB corpus took 23 s to read through at every start) until a file is written to."""
    from lmlab.data import cache

    first = TextDataModule(CharTokenizer(), str(small_corpus), cache_dir=str(tmp_path), block_size=16)
    first.prepare_data()
    folder = first.corpus.path
    for name in ("train", "val", "test"):  # older than the settling time, as any cache after a while
        os.utime(folder / f"{name}.bin", ns=(time.time_ns() - 10**10, time.time_ns() - 10**10))
    cache.load_entry(folder)  # reads them through and stamps them
    read = []
    monkeypatch.setattr(cache, "_check_ids", lambda ids, *args: read.append(len(ids)))
    cache.load_entry(folder)
    assert read == []  # trusted: not read again
    val = np.memmap(folder / "val.bin", dtype=first.corpus.ids["val"].dtype, mode="r+")
    val[0] = 60_000 % np.iinfo(val.dtype).max
    val.flush()
    del val
    monkeypatch.undo()
    with pytest.raises(cache.DamagedEntry, match="val.bin holds id"):
        cache.load_entry(folder)
