"""Preparing a corpus larger than memory: MB/s and peak memory per tokenizer, then the start from the cache.

    python bench/prepare_corpus.py                          # a 4 GB synthetic corpus, char / word / bpe
    python bench/prepare_corpus.py --size 100MB             # smaller
    python bench/prepare_corpus.py --size 4GB --tokenizers bpe --keep-corpus   # one tokenizer per command
    python bench/prepare_corpus.py --size 4GB --tokenizers word --train-only   # the tokenizer's training alone
    python bench/prepare_corpus.py --size 200MB --tokenizers char --old-eval-windows  # the run as before 8eeff23
    python bench/prepare_corpus.py --size 4GB --tokenizers word --keep-corpus --study prepare_corpus_4gb_train

A run of some of the tokenizers writes prepare_corpus_<size>_<names>.json, so that one command
per tokenizer (each within a time limit) does not overwrite the others' results; `--keep-corpus`
leaves the generated corpus for the next command to reuse. `--study NAME` adds the rows to
bench/results/NAME.json instead (replacing that file's rows of the same tokenizers), so that one
study measured one tokenizer per command stays one file; each row then carries its own date,
commit, machine and the load average around it.

Each child's CPU seconds (all its threads, `<phase>_cpu_s`) are recorded beside its wall time: on a
shared machine the wall times depend on the others' load, the CPU seconds much less.

The corpus is Tiny Shakespeare's lines in seeded random orders, written block by block up to the
size, so every tokenizer sees natural text and the generator never holds the corpus. Each
tokenizer (its conf/tokenizer/<name>.yaml) then prepares it in a fresh process with an empty cache:
hashing, the exact byte split, tokenizer training on the training split, encoding into the
memory-mapped token cache. Peak RSS is that process's ru_maxrss, read once the tokenizer has
trained (train_peak_rss_MB: hashing, cutting and training) and at the end. A second fresh process times
what a training run pays before its first step once the cache exists: building the data module,
prepare_data() and the first training batch (Python's imports excluded). A third runs a short
training from that cache through lmlab's own entry (`lmlab.run.train.train` on a config composed as
`python train.py` composes it): data=text, a one-layer GPT (d_model 32), block 64, 4 steps with a
validation at step 2, two batches of each validation and test pass, on CPU. Building the validation
and test datasets is where a run used to copy each whole split into int64 arrays, so even these few
batches measure it (`--old-eval-windows` puts that EvalWindows back into the run, for comparison).

Peak anonymous memory (`*_anon_MB`) is what the memory target is about. ru_maxrss counts every
resident page, the token cache's memory-mapped pages included: reading a split through the map
raises it by the pages touched, which the kernel drops whenever memory is short, so it grows with
the corpus without being memory the process holds. `RssAnon` in /proc/self/status counts only
anonymous pages (heap, arrays, tensors, thread stacks), the memory that cannot be given back; Linux
keeps no high-water mark of it, so a daemon thread in each child reads it every 20 ms and keeps the
largest value (read once more when the figure is taken), over the whole process: imports, every
step, the end. A peak shorter than 20 ms, or one inside a call that holds the GIL and frees its
memory before returning, can slip between samples.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, git_commit, machine, table, write_results

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


class AnonPeak:
    """The largest RssAnon of this process seen so far: a daemon thread samples it every `interval` s."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak_kib = interval, 0
        self._status = Path("/proc/self/status")

    def read_kib(self) -> int:
        for line in self._status.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])  # "RssAnon:   123456 kB"
        return 0  # not Linux: no figure

    def sample(self) -> None:
        self.peak_kib = max(self.peak_kib, self.read_kib())

    def start(self) -> AnonPeak:
        def loop() -> None:
            while True:
                self.sample()
                time.sleep(self.interval)

        threading.Thread(target=loop, name="anon-peak", daemon=True).start()
        return self

    def mb(self) -> float:
        """The peak so far in MiB (the unit of the ru_maxrss figures), the current value included."""
        self.sample()
        return self.peak_kib / 1024


ANON = AnonPeak()  # started by a child process (main), read by its step
OLD_EVAL_WINDOWS = "LMLAB_BENCH_OLD_EVAL_WINDOWS"  # set: the train step uses EvalWindows as before 8eeff23


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
        trained.update(
            train_s=time.perf_counter() - begun, train_peak_rss_MB=peak_rss_mb(), train_peak_anon_MB=ANON.mb()
        )

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
        "peak_anon_MB": ANON.mb(),
        "cache_MB": sum(f.stat().st_size for f in dm.corpus.path.iterdir()) / 1e6,
    }


def child_tokenizer(tokenizer: str, corpus: Path, cache: Path) -> dict:
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
        "train_peak_anon_MB": ANON.mb(),
    }


def child_start(tokenizer: str, corpus: Path, cache: Path) -> dict:
    """What a run pays before its first step when the cache exists."""
    from lmlab.data import TextDataModule

    start = time.perf_counter()
    dm = TextDataModule(tokenizer_from_conf(tokenizer), str(corpus), cache_dir=str(cache))
    dm.prepare_data()
    next(iter(dm.train_dataloader()))
    return {"start_s": time.perf_counter() - start, "start_rss_MB": peak_rss_mb(), "start_anon_MB": ANON.mb()}


class OldEvalWindows:
    """EvalWindows as it was before 8eeff23 (git show 8eeff23^:src/lmlab/data/windows.py): the split,
    its context token prepended, copied to int64 and padded into x and y arrays when built. Only for
    `--old-eval-windows`, to show what gathering windows from the memory map saves."""

    def __init__(self, ids, block_size: int, context_token: int = 0, *, rank=0, world_size=1, stride=None) -> None:
        import numpy as np
        import torch

        from lmlab.data.windows import IGNORE_INDEX

        assert stride in (None, block_size), "the old EvalWindows had no sliding windows"

        def pad(a, length, value):
            return np.concatenate([a, np.full(length - len(a), value, dtype=a.dtype)]) if len(a) < length else a

        n_windows = -(-len(ids) // block_size)
        per_rank = -(-n_windows // world_size)
        first = min(rank * per_rank, n_windows) * block_size
        last = min((rank + 1) * per_rank, n_windows) * block_size
        stream = np.concatenate([[context_token], ids]).astype(np.int64)
        length = per_rank * block_size
        self.x = torch.from_numpy(pad(stream[first:last], length, 0).reshape(per_rank, block_size))
        self.y = torch.from_numpy(pad(stream[first + 1 : last + 1], length, IGNORE_INDEX).reshape(per_rank, block_size))

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: list[int]):  # the data module's loader expects whole batches
        return self.x[indices], self.y[indices]


def child_train(tokenizer: str, corpus: Path, cache: Path) -> dict:
    """A short training run from the prepared cache through lmlab's entry, `train(cfg)` on a config
    composed as `python train.py OVERRIDES` composes it (tests/helpers.py does the same): fit with one
    validation in the middle, then the final validation and test on the best checkpoint."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import lmlab.data.datamodule
    from lmlab.cli import register_resolvers
    from lmlab.run.train import train

    if os.environ.get(OLD_EVAL_WINDOWS):
        lmlab.data.datamodule.EvalWindows = OldEvalWindows
    register_resolvers()
    run_dir = cache.parent / f"run-{tokenizer}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        "data=text",
        f"data.path={corpus}",
        f"paths.cache_dir={cache}",
        f"tokenizer={tokenizer}",
        "model=gpt",
        "model.n_layer=1",
        "model.d_model=32",
        "model.n_head=2",
        "data.block_size=64",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "task.scheduler.warmup_steps=1",
        "sample.max_new_tokens=8",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        del cfg["hydra"]
    entries = set(cache.rglob("*"))
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "run_s": seconds,
        "run_reused_cache": set(cache.rglob("*")) == entries,  # the prepared cache, not a new preparation
        "run_steps": metrics["steps"],
        "run_val_bpb": metrics["val/bpb"],
        "run_peak_rss_MB": peak_rss_mb(),
        "run_peak_anon_MB": ANON.mb(),
        "old_eval_windows": bool(os.environ.get(OLD_EVAL_WINDOWS)),
    }


CHILDREN = {"prepare": child_prepare, "start": child_start, "train": child_train, "tokenizer": child_tokenizer}


def run_child(mode: str, tokenizer: str, corpus: Path, cache: Path, old_eval_windows: bool = False) -> dict:
    out = cache.parent / f"{tokenizer}-{mode}.json"
    command = [sys.executable, __file__, "--child", mode, "--tokenizers", tokenizer]
    command += ["--corpus", str(corpus), "--cache", str(cache), "--out", str(out)]
    env = {**os.environ, OLD_EVAL_WINDOWS: "1"} if old_eval_windows else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, env=env)  # the progress bars show in this terminal
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.read_text())
    out.unlink()
    # CPU seconds of the child, all its threads: on a shared machine the wall times depend on the
    # others' load, this does much less
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**result, f"{'run' if mode == 'train' else mode}_cpu_s": round(cpu, 1)}


def add_to_study(name: str, payload: dict) -> Path:
    """`RESULTS/<name>.json` with this command's rows added: its earlier rows of other tokenizers kept
    (each stamped with the date, commit and machine it was measured on), those of the same replaced."""
    path, info = RESULTS / f"{name}.json", machine()
    stamp = {"date": info["date"], "commit": git_commit(), "machine": info}
    rows = [{**stamp, **row} for row in payload.pop("results")]
    kept = []
    if path.exists():
        earlier = json.loads(path.read_text())
        own = {"date": earlier["machine"]["date"], "commit": earlier["commit"], "machine": earlier["machine"]}
        kept = [{**own, **row} for row in earlier["results"]]  # a row from before --study: the file's stamp
    done = {row["tokenizer"] for row in rows}
    payload["results"] = [row for row in kept if row["tokenizer"] not in done] + rows
    return write_results(name, payload)


def versions() -> dict:
    import datasets
    import tokenizers

    return {"tokenizers": tokenizers.__version__, "datasets": datasets.__version__, "git_commit": git_commit()}


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
    parser.add_argument("--no-train", action="store_true", help="skip the short training run from the cache")
    parser.add_argument(
        "--old-eval-windows",
        action="store_true",
        help="the training run with EvalWindows as before 8eeff23 (int64 copies of each split), to compare",
    )
    parser.add_argument(
        "--study", help="add the rows to bench/results/STUDY.json (replacing its rows of these tokenizers)"
    )
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ANON.start()
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
            rows.append(run_child("tokenizer", name, corpus, cache))
            continue
        load_before = os.getloadavg()[0]
        row = run_child("prepare", name, corpus, cache)
        row.update(run_child("start", name, corpus, cache))
        if not args.no_train:
            row.update(run_child("train", name, corpus, cache, args.old_eval_windows))
        row["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # others' work beside it
        rows.append(row)
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    columns = [
        "tokenizer",
        "MB",
        "vocab",
        "tokens",
        "prepare_s",
        "prepare_cpu_s",
        "MB_per_s",
        "train_s",
        "train_peak_rss_MB",
    ]
    columns += ["train_peak_anon_MB", "peak_rss_MB", "peak_anon_MB", "start_s", "start_rss_MB", "start_anon_MB"]
    if not args.no_train:
        columns += ["run_s", "run_cpu_s", "run_peak_rss_MB", "run_peak_anon_MB"]
    if args.train_only:
        columns = [
            "tokenizer",
            "train_split_MB",
            "vocab",
            "train_s",
            "tokenizer_cpu_s",
            "train_peak_rss_MB",
            "train_peak_anon_MB",
        ]
    print(table(rows, columns))
    payload = {"corpus_bytes": corpus.stat().st_size, "versions": versions(), "results": rows}
    name = f"prepare_corpus_{args.size.lower()}"
    if args.tokenizers != DEFAULT_TOKENIZERS:
        name += "_" + args.tokenizers.replace(",", "_")
    if args.train_only:
        name += "_train_only"
    elif args.old_eval_windows and not args.no_train:
        name += "_old_eval_windows"
    print("written to", add_to_study(args.study, payload) if args.study else write_results(name, payload))
    if not (args.keep or args.keep_corpus):
        corpus.unlink()


if __name__ == "__main__":
    main()
