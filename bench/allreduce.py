"""All-reduce bandwidth between this node's GPUs: what data parallelism's gradient averaging can reach.

DDP averages every gradient once per step. GPT-2 small's 124M fp32 gradients are 0.5 GB; at the
bus bandwidth this prints, that costs `size / bandwidth x 2(n-1)/n` per step, to be hidden behind
the backward pass. A low figure (PCIe rather than NVLink) explains a poor DDP speed-up on its own.

    python bench/allreduce.py --gpus 2                 # NCCL, sizes 1 MB to 512 MB
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

SIZES_MB = [1, 16, 128, 512]


def worker(rank: int, world: int, repeats: int, out: dict) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    rows = []
    for size_mb in SIZES_MB:
        x = torch.ones(size_mb * 2**20 // 4, device="cuda")
        for _ in range(3):  # NCCL sets up its channels on the first calls
            dist.all_reduce(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
        algorithm_gb_s = size_mb * 2**20 / seconds / 1e9
        rows.append(
            {
                "size_mb": size_mb,
                "ms": 1000 * seconds,
                "algbw_gb_s": algorithm_gb_s,
                "busbw_gb_s": algorithm_gb_s * 2 * (world - 1) / world,  # NCCL's bus bandwidth convention
            }
        )
    if rank == 0:
        out["rows"] = rows
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--name", default="allreduce")
    args = parser.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args.gpus, args.repeats, out), nprocs=args.gpus)
        rows = list(out["rows"])
    print(table(rows, ["size_mb", "ms", "algbw_gb_s", "busbw_gb_s"]))
    write_results(args.name, {"gpus": args.gpus, "rows": rows})


if __name__ == "__main__":
    main()
