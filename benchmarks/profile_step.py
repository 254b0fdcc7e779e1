"""Where a D+G training step spends its time: torch.profiler over one step after one warm-up.

    python benchmarks/profile_step.py                                   # galip's default levers, B=8, ViT-B/32
    python benchmarks/profile_step.py --levers none                     # the official computation
    python benchmarks/profile_step.py --levers default,cached_text --batch 8 --geometry tiny

In one process huge pages follow the environment (`import galip` sets THP_MEM_ALLOC_ENABLE=1 unless it is set),
not ``--levers``: run ``THP_MEM_ALLOC_ENABLE=0 python benchmarks/profile_step.py --levers none`` for the
official computation with the default allocator.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levers", default="default", help="as speed.py; 'default,x' adds x to the defaults")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--geometry", choices=("vit_b32", "tiny"), default="vit_b32")
    p.add_argument("--rows", type=int, default=20)
    args = p.parse_args(argv)
    parts = args.levers.split(",")
    levers = speed.parse_levers(parts[0]) + speed.parse_levers(",".join(parts[1:]) or "none")
    device = torch.device("cpu")
    module = speed.build_module(args.geometry, device, levers)
    step = speed.case_fn("step", module, speed.make_batch(module, args.batch, device), levers)
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        print(f"levers {list(levers)}: one step {time.perf_counter() - start:.2f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
