"""Where text comes from: split files, split-named folders, any extension, streamed preparation."""

from __future__ import annotations

import logging
import multiprocessing
import os

import numpy as np
import pytest

from lmlab.data import HFDataModule, TextDataModule
from lmlab.data.cache import tokenize_with_cache
from lmlab.data.corpus import split_by_bytes
from lmlab.data.prepare import prepare_corpus
from lmlab.data.sources import ConcatText, local_source
from lmlab.errors import ConfigError, DataError
from lmlab.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer
from tests.conftest import SHAKESPEARE

TEXT = SHAKESPEARE.read_text()[:12_000]


def write_splits(folder, names=("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"), sizes=(8000, 2000, 2000)):
    """Three split files cut from Shakespeare; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for name, size in zip(names, sizes):
        (folder / name).write_text(TEXT[start : start + size])
        paths.append(folder / name)
        start += size
    return paths


def prepared(tmp_path, tokenizer=None, **data):
    dm = TextDataModule(tokenizer or CharTokenizer(), cache_dir=str(tmp_path / "cache"), block_size=8, **data)
    dm.prepare_data()
    return dm


def test_explicit_split_files_give_each_splits_exact_bytes(tmp_path):
    train, val, test = write_splits(tmp_path / "c", names=("a.txt", "b.txt", "c.txt"))
    dm = prepared(tmp_path, train=str(train), val=str(val), test=str(test))
    assert dm.corpus.split_bytes == {"train": 8000, "val": 2000, "test": 2000}
    for split, path in zip(("train", "val", "test"), (train, val, test)):
        assert np.array_equal(dm.corpus.ids[split], dm.tokenizer.encode(path.read_text()))
    assert dm.name == "c"


def test_a_ptb_shaped_folder_is_read_as_its_own_splits(tmp_path, caplog):
    folder = tmp_path / "ptb"
    _, val, _ = write_splits(folder)
    (folder / "README").write_text("not a split\n")
    with caplog.at_level(logging.INFO, logger="lmlab.data.sources"):
        dm = prepared(tmp_path, path=str(folder))
    assert dm.corpus.split_bytes == {"train": 8000, "val": 2000, "test": 2000}
    assert np.array_equal(dm.corpus.ids["val"], dm.tokenizer.encode(val.read_text()))
    assert "leaving out 1 other file(s): README" in caplog.text
    assert "train=ptb.train.txt, val=ptb.valid.txt, test=ptb.test.txt" in caplog.text


def test_the_hash_covers_which_file_is_which_split(tmp_path):
    a, b, c = write_splits(tmp_path / "c", names=("a.txt", "b.txt", "c.txt"), sizes=(8000, 2000, 2000))
    first = prepared(tmp_path, train=str(a), val=str(b), test=str(c))
    swapped = prepared(tmp_path, train=str(a), val=str(c), test=str(b))
    assert first.corpus.corpus_sha256 != swapped.corpus.corpus_sha256
    assert first.corpus.path != swapped.corpus.path


def test_a_tokens_file_loads_and_binaries_in_a_folder_are_skipped_with_a_notice(tmp_path, caplog):
    folder = tmp_path / "wikitext"
    write_splits(folder, names=("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"))
    (folder / "weights.bin").write_bytes(b"\x00\x01\x02" * 10)
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with caplog.at_level(logging.WARNING, logger="lmlab.data.sources"):
        dm = prepared(tmp_path, path=str(folder))
    assert dm.corpus.split_bytes["train"] == 8000
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "skipping 2 file(s)" in notices[0] and "logo.png, weights.bin" in notices[0]
    single = prepared(tmp_path, path=str(folder / "wiki.train.tokens"))  # one .tokens file, cut by data.splits
    assert sum(single.corpus.split_bytes.values()) == 8000


def test_glob_narrows_a_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.md").write_text(TEXT[:6000])
    (folder / "b.txt").write_text(TEXT[6000:9000])
    (folder / "sub").mkdir()
    (folder / "sub" / "c.txt").write_text(TEXT[9000:12000])
    assert sum(prepared(tmp_path, path=str(folder)).corpus.split_bytes.values()) == 12000 + 2  # joined by newlines
    assert sum(prepared(tmp_path, path=str(folder), glob="*.txt").corpus.split_bytes.values()) == 3000
    assert sum(prepared(tmp_path, path=str(folder), glob="**/*.txt").corpus.split_bytes.values()) == 6001


@pytest.mark.parametrize("make", [CharTokenizer, WordTokenizer, lambda: BPETokenizer(vocab_size=300)])
def test_streamed_preparation_equals_the_in_memory_path(tmp_path, make):
    folder = tmp_path / "corpus"
    folder.mkdir()
    text = TEXT.replace("the", "thé—") + "日本語\n" * 50  # multi-byte characters cut by the 7-byte blocks
    (folder / "a.txt").write_text(text[:7001])
    (folder / "b.txt").write_text(text[7001:])
    in_memory = tokenize_with_cache(
        "m", split_by_bytes(text[:7001] + "\n" + text[7001:], [0.8, 0.1, 0.1]), [0.8, 0.1, 0.1], make(), tmp_path / "a"
    )
    source = local_source(str(folder), splits=[0.8, 0.1, 0.1])
    streamed = prepare_corpus(source, make(), tmp_path / "b", "s", chunk_bytes=7)
    assert streamed.split_bytes == in_memory.split_bytes
    assert streamed.corpus_sha256 == in_memory.corpus_sha256
    assert streamed.tokenizer.to_json() == in_memory.tokenizer.to_json()
    for split in ("train", "val", "test"):
        assert np.array_equal(streamed.ids[split], in_memory.ids[split]), split


def test_byte_cuts_on_disk_equal_the_cuts_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    for trial in range(20):
        lines = ["".join(rng.choice(list("ab é日\t"), size=rng.integers(0, 30))) for _ in range(rng.integers(3, 60))]
        text = "\n".join(lines) + "x" * 30
        (tmp_path / f"{trial}.txt").write_text(text)
        source = local_source(str(tmp_path / f"{trial}.txt"), splits=[0.6, 0.3, 0.1])
        ranges = source.ranges()
        parts = {name: text_.read(a, b).decode() for name, (text_, a, b) in ranges.items()}
        assert parts == split_by_bytes(text, [0.6, 0.3, 0.1])


def test_the_cache_is_written_atomically(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text(TEXT)
    tokenizer = CharTokenizer()
    real_encode, calls = tokenizer.encode, []

    def crash_on_test_split(text):
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while encoding the last split
        return real_encode(text)

    monkeypatch.setattr(tokenizer, "encode", crash_on_test_split)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(local_source(str(tmp_path / "t.txt")), tokenizer, tmp_path / "cache", "t")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "corpus-hashes",
        "locks",
    ]  # no entry, no temporary
    corpus = prepare_corpus(local_source(str(tmp_path / "t.txt")), CharTokenizer(), tmp_path / "cache", "t")
    assert corpus.tokenizer.decode(corpus.ids["test"]) == split_by_bytes(TEXT, [0.9, 0.05, 0.05])["test"]


def _prepare_in_child(path, cache, markers):
    import lmlab.data.prepare as prepare

    real_build = prepare.build_entry

    def build_and_mark(*args, **kwargs):
        (markers / str(os.getpid())).touch()
        real_build(*args, **kwargs)

    prepare.build_entry = build_and_mark
    prepare_corpus(local_source(path), CharTokenizer(), cache, "t")


def test_processes_preparing_one_corpus_at_once_build_its_entry_once(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT * 20)
    (tmp_path / "markers").mkdir()
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(
            target=_prepare_in_child, args=(str(tmp_path / "t.txt"), tmp_path / "cache", tmp_path / "markers")
        )
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    assert len(list((tmp_path / "markers").iterdir())) == 1  # one built it, the others waited and loaded it


def test_a_cached_corpus_starts_without_reading_its_text_until_a_file_changes(tmp_path, monkeypatch):
    corpus = tmp_path / "t.txt"
    corpus.write_text(TEXT)
    first = prepared(tmp_path, path=str(corpus))
    real_blocks = ConcatText.blocks

    def refuse(*args, **kwargs):
        raise AssertionError("the text was read although its token cache exists")

    monkeypatch.setattr(ConcatText, "blocks", refuse)
    assert prepared(tmp_path, path=str(corpus)).corpus.path == first.corpus.path
    monkeypatch.setattr(ConcatText, "blocks", real_blocks)
    corpus.write_text(TEXT[:-100])
    changed = prepared(tmp_path, path=str(corpus))
    assert changed.corpus.path != first.corpus.path and sum(changed.corpus.split_bytes.values()) == len(TEXT) - 100


def test_an_invalid_byte_deep_in_a_folder_names_its_file_and_offset(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.txt").write_bytes(b"x" * 70_000 + b"caf\xe9\n" + b"y\n" * 10)  # past the UTF-8 sniff
    with pytest.raises(DataError, match=r"b\.txt is not UTF-8 text \(invalid byte 0xe9 at byte offset 70003\)"):
        prepare_corpus(local_source(str(folder)), CharTokenizer(), tmp_path / "cache", "f", chunk_bytes=4096)


def corpus_folders(tmp_path):
    write_splits(tmp_path / "ptb")
    write_splits(tmp_path / "partial", names=("train.txt", "test.txt"), sizes=(8000, 2000))
    (tmp_path / "empty_split").mkdir()
    write_splits(tmp_path / "empty_split")
    (tmp_path / "empty_split" / "ptb.valid.txt").write_text("")
    (tmp_path / "binaries").mkdir()
    (tmp_path / "binaries" / "w.bin").write_bytes(b"\x00\x01")
    (tmp_path / "one.txt").write_text(TEXT)


BAD = {
    "missing split file": (
        dict(train="{d}/one.txt", val="{d}/nope.txt", test="{d}/one.txt"),
        "data.val=.*does not exist",
    ),
    "empty split file": (dict(path="{d}/empty_split"), r"split file .*ptb\.valid\.txt is empty"),
    "split files mixed with data.splits": (
        dict(train="{d}/one.txt", val="{d}/one.txt", test="{d}/one.txt", splits=[0.8, 0.1, 0.1]),
        r"data.splits=\[0.8, 0.1, 0.1\] cannot apply: data.train/val/test are given",
    ),
    "split folder mixed with data.splits": (
        dict(path="{d}/ptb", splits=[0.8, 0.1, 0.1]),
        "cannot apply: folder .*ptb holds its own split files",
    ),
    "two of three split files": (dict(train="{d}/one.txt", val="{d}/one.txt"), "data.test is not set"),
    "split files and data.path": (
        dict(path="{d}/one.txt", train="{d}/one.txt", val="{d}/one.txt", test="{d}/one.txt"),
        "data.path=.* and data.train/val/test are both set",
    ),
    "a training file without the others": (dict(path="{d}/partial"), "holds a training file but no val file"),
    "no readable text files": (dict(path="{d}/binaries"), "holds no text files"),
    "a glob matching nothing": (dict(path="{d}/ptb", glob="*.tokens"), "data.glob='\\*.tokens' matches no file"),
    "a glob on a file": (dict(path="{d}/one.txt", glob="*.txt"), "data.glob='\\*.txt' narrows a folder"),
    "nothing given": (dict(), "data.path is not set"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_corpus_settings_end_in_one_line(tmp_path, case):
    corpus_folders(tmp_path)
    settings, message = BAD[case]
    settings = {k: v.format(d=tmp_path) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises((DataError, ConfigError), match=message) as err:
        prepared(tmp_path, **settings)
    assert "\n" not in str(err.value)


def test_data_ptb_reads_the_bundled_penn_treebank_as_its_own_splits(tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config(["data=ptb"], tmp_path)
    source = instantiate(cfg.data, tokenizer=CharTokenizer()).corpus_source()
    assert source.predefined
    assert {name: text.size for name, text in source.texts.items()} == {
        "train": 5101618,
        "val": 399782,
        "test": 449945,
    }


def test_hugging_face_splits_by_name_and_streamed(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = TEXT.splitlines()
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": rows[:300]}),
            "validation": datasets.Dataset.from_dict({"text": rows[300:350]}),
            "test": datasets.Dataset.from_dict({"text": rows[350:400]}),
        }
    ).save_to_disk(str(tmp_path / "ds"))
    results = []
    for streaming in (False, True):
        dm = HFDataModule(
            CharTokenizer(),
            str(tmp_path / "ds"),
            cache_dir=str(tmp_path / f"cache{streaming}"),
            block_size=8,
            train="train",
            val="validation",
            test="test",
            streaming=streaming,
        )
        dm.prepare_data()
        results.append(dm.corpus)
    kept = [r for r in rows[300:350] if r]
    assert np.array_equal(results[0].ids["val"], results[0].tokenizer.encode("\n".join(kept)))
    assert results[0].split_bytes == results[1].split_bytes
    assert results[0].corpus_sha256 == results[1].corpus_sha256


def test_spooled_dataset_text_is_reused(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets.Dataset.from_dict({"text": TEXT.splitlines()}).save_to_disk(str(tmp_path / "ds"))
    make = lambda: HFDataModule(CharTokenizer(), str(tmp_path / "ds"), cache_dir=str(tmp_path / "c"), block_size=8)  # noqa: E731
    (first,) = make().corpus_source().texts["all"].files
    stamp = first.stat().st_mtime_ns
    (again,) = make().corpus_source().texts["all"].files
    assert again == first and again.stat().st_mtime_ns == stamp  # found again, not rewritten
    assert first.read_text() == TEXT.rstrip("\n").replace("\n\n", "\n")  # empty rows dropped


def test_ptb_shaped_text_counts_words_and_eos_and_no_unknowns_for_its_own_unk(tmp_path):
    folder = tmp_path / "ptb"
    folder.mkdir()
    lines = {"train": " the <unk> rose N \n a <unk> fell \n", "valid": " the rose fell \n", "test": " a rose \n"}
    for name, text in lines.items():
        (folder / f"ptb.{name}.txt").write_text(text * 20)
    tokenizer = WordTokenizer(min_frequency=1, unk=True, split="whitespace", eos_per_line=True)
    dm = prepared(tmp_path, tokenizer, path=str(folder))
    assert dm.corpus.split_tokens == {"train": (5 + 4) * 20, "val": 4 * 20, "test": 3 * 20}  # words + <eos> per line
    assert dm.corpus.unk_tokens == {"train": 0, "val": 0, "test": 0}  # <unk> written in PTB is a word of it
    assert dm.tokenizer.vocab_size == 7  # the, <unk>, rose, N, a, fell + <eos>
