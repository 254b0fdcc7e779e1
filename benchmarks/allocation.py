"""Why huge pages pay on a CPU: the cost of a fresh large map against the arithmetic done on it.

One elementwise op on a [8, 128, 224, 224] fp32 map (205 MB, the size of G's 224 px feature maps at B=8),
with a freshly allocated output and with a preallocated one. Run it twice to compare the allocator settings:

    THP_MEM_ALLOC_ENABLE=0 python benchmarks/allocation.py
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/allocation.py     # what `import galip` sets by default

(torch reads the variable at its first large allocation, so it must be set before the script starts.)
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F


def repeat_times(fn, repeats: int = 5) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_of(fn, repeats: int = 5) -> float:
    return min(repeat_times(fn, repeats))


def main() -> None:
    x = torch.randn(8, 128, 224, 224)
    gamma, beta = torch.randn(8, 128, 1, 1), torch.randn(8, 128, 1, 1)
    out = torch.empty_like(x)
    cases = {
        "gamma * x + beta (two fresh maps)": lambda: gamma * x + beta,
        "addcmul (one fresh map)": lambda: torch.addcmul(beta, gamma, x),
        "addcmul into a preallocated map": lambda: torch.addcmul(beta, gamma, x, out=out),
        "leaky_relu (fresh map)": lambda: F.leaky_relu(x, 0.2),
        "leaky_relu_ in place": lambda: F.leaky_relu_(out, 0.2),
        "allocate + fill a map": lambda: torch.empty_like(x).fill_(1.0),
    }
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, threads {torch.get_num_threads()}")
    for name, fn in cases.items():
        print(f"  {name:36s} {best_of(fn):.3f} s (best of 5)")


if __name__ == "__main__":
    main()
