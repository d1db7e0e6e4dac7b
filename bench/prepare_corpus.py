"""Preparing a corpus larger than memory: MB/s and peak memory per tokenizer, then the start from the cache.

    python bench/prepare_corpus.py                          # a 4 GB synthetic corpus, char / word / bpe
    python bench/prepare_corpus.py --size 100MB             # smaller
    python bench/prepare_corpus.py --size 4GB --tokenizers bpe --keep-corpus   # one tokenizer per command
    python bench/prepare_corpus.py --size 4GB --tokenizers word --train-only   # the tokenizer's training alone

A run of some of the tokenizers writes prepare_corpus_<size>_<names>.json, so that one command
per tokenizer (each within a time limit) does not overwrite the others' results; `--keep-corpus`
leaves the generated corpus for the next command to reuse.

The corpus is Tiny Shakespeare's lines in seeded random orders, written block by block up to the
size, so every tokenizer sees natural text and the generator never holds the corpus. Each
tokenizer (its conf/tokenizer/<name>.yaml) then prepares it in a fresh process with an empty cache:
hashing, the exact byte split, tokenizer training on the training split, encoding into the
memory-mapped token cache. Peak RSS is that process's ru_maxrss, read once the tokenizer has
trained (train_peak_rss_MB: hashing, cutting and training) and at the end. A second fresh process times
what a training run pays before its first step once the cache exists: building the data module,
prepare_data() and the first training batch (Python's imports excluded).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
DEFAULT_TOKENIZERS = "char,word,bpe"


def parse_size(text: str) -> int:
    """'4GB', '200MB', '1500000' -> bytes (decimal units, as MB/s is counted)."""
    text = text.strip().upper()
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def synthetic_corpus(path: Path, size: int, seed: int = 0) -> Path:
    """Write (once) at least `size` bytes of Tiny Shakespeare lines, reshuffled every pass."""
    if path.exists() and path.stat().st_size >= size:
        return path
    lines = (ROOT / "data" / "tinyshakespeare.txt").read_text().splitlines(keepends=True)
    rng, written = random.Random(seed), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with tmp.open("w", encoding="utf-8") as out:
        while written < size:
            rng.shuffle(lines)
            block = "".join(lines)
            out.write(block)
            written += len(block.encode("utf-8"))
    tmp.replace(path)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tokenizer_from_conf(name: str):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.load(ROOT / "conf" / "tokenizer" / f"{name}.yaml"))


def child_prepare(tokenizer: str, corpus: Path, cache: Path) -> dict:
    """One preparation from an empty cache, as `python train.py` runs it; the peak RSS is also read
    when the tokenizer has trained (before encoding), the step that used to hold the training split."""
    import lmlab.data.cache as token_cache
    from lmlab.data import TextDataModule

    trained: dict[str, float] = {}
    train_tokenizer = token_cache.train_tokenizer

    def measured_training(*args, **kwargs) -> None:
        begun = time.perf_counter()
        train_tokenizer(*args, **kwargs)
        trained.update(train_s=time.perf_counter() - begun, train_peak_rss_MB=peak_rss_mb())

    token_cache.train_tokenizer = measured_training
    start = time.perf_counter()
    dm = TextDataModule(tokenizer_from_conf(tokenizer), str(corpus), cache_dir=str(cache))
    dm.prepare_data()
    seconds = time.perf_counter() - start
    megabytes = sum(dm.corpus.split_bytes.values()) / 1e6
    return {
        "tokenizer": tokenizer,
        "MB": megabytes,
        "vocab": dm.tokenizer.vocab_size,
        "tokens": sum(dm.corpus.split_tokens.values()),
        "prepare_s": seconds,
        "MB_per_s": megabytes / seconds,
        **trained,
        "peak_rss_MB": peak_rss_mb(),
        "cache_MB": sum(f.stat().st_size for f in dm.corpus.path.iterdir()) / 1e6,
    }


def child_train(tokenizer: str, corpus: Path, cache: Path) -> dict:
    """Only what preparation does up to the trained tokenizer (the byte split, the training split
    streamed into the tokenizer), for a quick look at that step's memory on a large corpus."""
    from lmlab.data.cache import train_tokenizer
    from lmlab.data.prepare import CHUNK_BYTES, text_pieces
    from lmlab.data.sources import local_source

    trained = tokenizer_from_conf(tokenizer)
    start = time.perf_counter()
    text, first, end = local_source(str(corpus)).ranges()["train"]
    train_tokenizer(trained, text_pieces(text, first, end, CHUNK_BYTES))
    return {
        "tokenizer": tokenizer,
        "train_split_MB": (end - first) / 1e6,
        "vocab": trained.vocab_size,
        "train_s": time.perf_counter() - start,
        "train_peak_rss_MB": peak_rss_mb(),
    }


def child_start(tokenizer: str, corpus: Path, cache: Path) -> dict:
    """What a run pays before its first step when the cache exists."""
    from lmlab.data import TextDataModule

    start = time.perf_counter()
    dm = TextDataModule(tokenizer_from_conf(tokenizer), str(corpus), cache_dir=str(cache))
    dm.prepare_data()
    next(iter(dm.train_dataloader()))
    return {"start_s": time.perf_counter() - start, "start_rss_MB": peak_rss_mb()}


CHILDREN = {"prepare": child_prepare, "start": child_start, "train": child_train}


def run_child(mode: str, tokenizer: str, corpus: Path, cache: Path) -> dict:
    out = cache.parent / f"{tokenizer}-{mode}.json"
    command = [sys.executable, __file__, "--child", mode, "--tokenizers", tokenizer]
    command += ["--corpus", str(corpus), "--cache", str(cache), "--out", str(out)]
    subprocess.run(command, check=True)  # the progress bars show in this terminal
    result = json.loads(out.read_text())
    out.unlink()
    return result


def versions() -> dict:
    import datasets
    import tokenizers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"tokenizers": tokenizers.__version__, "datasets": datasets.__version__, "git_commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="4GB", help="corpus size, e.g. 4GB, 200MB (default 4GB)")
    parser.add_argument("--tokenizers", default=DEFAULT_TOKENIZERS, help="conf/tokenizer choices, comma-separated")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-prepare")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and the token caches afterwards")
    parser.add_argument("--keep-corpus", action="store_true", help="keep the generated corpus (not the caches)")
    parser.add_argument(
        "--train-only", action="store_true", help="only train each tokenizer (memory of that step; no cache)"
    )
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.out.write_text(json.dumps(CHILDREN[args.child](args.tokenizers, args.corpus, args.cache)))
        return

    size = parse_size(args.size)
    started = time.perf_counter()
    corpus = synthetic_corpus(args.workdir / f"synthetic-{size}.txt", size)
    generated_s = time.perf_counter() - started
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:,.0f} MB, written in {generated_s:.0f} s)")
    rows = []
    for name in args.tokenizers.split(","):
        cache = args.workdir / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        if args.train_only:
            rows.append(run_child("train", name, corpus, cache))
            continue
        row = run_child("prepare", name, corpus, cache)
        row.update(run_child("start", name, corpus, cache))
        rows.append(row)
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    columns = ["tokenizer", "MB", "vocab", "tokens", "prepare_s", "MB_per_s", "train_s", "train_peak_rss_MB"]
    columns += ["peak_rss_MB", "start_s", "start_rss_MB"]
    if args.train_only:
        columns = ["tokenizer", "train_split_MB", "vocab", "train_s", "train_peak_rss_MB"]
    print(table(rows, columns))
    payload = {"corpus_bytes": corpus.stat().st_size, "versions": versions(), "results": rows}
    name = f"prepare_corpus_{args.size.lower()}"
    if args.tokenizers != DEFAULT_TOKENIZERS:
        name += "_" + args.tokenizers.replace(",", "_")
    if args.train_only:
        name += "_train_only"
    print("written to", write_results(name, payload))
    if not (args.keep or args.keep_corpus):
        corpus.unlink()


if __name__ == "__main__":
    main()
