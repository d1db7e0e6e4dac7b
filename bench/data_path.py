"""The data path: tokenizer training and encoding speed, and the token cache's second-run start-up.

    python bench/data_path.py                 # Tiny Shakespeare and a 100 MB synthetic corpus
    python bench/data_path.py --synthetic-mb 0    # Tiny Shakespeare only

The synthetic corpus is Tiny Shakespeare's lines in a seeded random order, repeated up to the size,
so every tokenizer sees natural text. Encoding uses each tokenizer's own batch encoder (HF
`encode_batch` over newline-aligned chunks, all cores).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

from lmlab.data import TextDataModule
from lmlab.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = {"char": CharTokenizer, "word": WordTokenizer, "bpe": lambda: BPETokenizer(vocab_size=1024)}


def synthetic(text: str, megabytes: int) -> str:
    lines = text.splitlines(keepends=True)
    rng, out, size = random.Random(0), [], 0
    while size < megabytes * 1_000_000:
        rng.shuffle(lines)
        out.extend(lines)
        size += len(text)
    return "".join(out)


def speed(name: str, corpus_name: str, text: str) -> dict:
    train_text = text[: int(len(text) * 0.9)]
    tokenizer = TOKENIZERS[name]()
    start = time.perf_counter()
    tokenizer.train(train_text)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    ids = tokenizer.encode(text)
    encoded = time.perf_counter() - start
    megabytes = len(text.encode()) / 1e6
    return {
        "corpus": corpus_name,
        "tokenizer": name,
        "MB": megabytes,
        "vocab": tokenizer.vocab_size,
        "train_s": trained,
        "encode_s": encoded,
        "encode_MB_s": megabytes / encoded,
        "bytes_per_token": len(text.encode()) / len(ids),
    }


def startup(name: str) -> dict:
    """prepare_data() on an empty cache, then again on the filled one (what a second run pays)."""
    cache = tempfile.mkdtemp()
    times = []
    for _ in range(2):
        dm = TextDataModule(TOKENIZERS[name](), str(ROOT / "data" / "tinyshakespeare.txt"), cache_dir=cache)
        start = time.perf_counter()
        dm.prepare_data()
        times.append(time.perf_counter() - start)
    return {"tokenizer": name, "first_run_s": times[0], "cached_run_s": times[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-mb", type=int, default=100)
    args = parser.parse_args()
    shakespeare = (ROOT / "data" / "tinyshakespeare.txt").read_text()
    corpora = {"tinyshakespeare": shakespeare}
    if args.synthetic_mb:
        corpora[f"synthetic {args.synthetic_mb} MB"] = synthetic(shakespeare, args.synthetic_mb)
    speeds = [speed(name, corpus, text) for corpus, text in corpora.items() for name in TOKENIZERS]
    startups = [startup(name) for name in TOKENIZERS]
    print(
        table(speeds, ["corpus", "tokenizer", "MB", "vocab", "train_s", "encode_s", "encode_MB_s", "bytes_per_token"])
    )
    print(table(startups, ["tokenizer", "first_run_s", "cached_run_s"]))
    print("written to", write_results("data_path", {"speed": speeds, "startup": startups}))


if __name__ == "__main__":
    main()
