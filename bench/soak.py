"""Soak run: N random cases over every loss (fusedloss._fuzz), each checked
against torch, with the process's memory watched.

    python bench/soak.py [--cases 10000] [--device cpu|cuda] [--seed 0]

Prints mismatches as they happen and a summary: cases run, mismatches, and
resident memory (CPU) or allocated memory (CUDA) after the first 10% and at
the end. Exits non-zero on any mismatch or memory growth.
"""

import argparse
import resource
import sys
import time

import torch

from fusedloss import _fuzz
from fusedloss.testing import assert_matches_torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    mem = (lambda: torch.cuda.memory_allocated() / 2**20) if args.device == "cuda" else rss_mb
    mismatches = 0
    warm_mem = None
    t0 = time.time()
    for i in range(args.cases):
        loss = _fuzz.LOSSES[i % len(_fuzz.LOSSES)]
        case = _fuzz.draw_case(loss, g, device=args.device)
        try:
            assert_matches_torch(case.name, *case.args, native=case.native, **case.kwargs)
        except AssertionError as e:
            mismatches += 1
            print(f"MISMATCH case {i}: {case.describe()}\n  {str(e).splitlines()[0]}", flush=True)
        if i + 1 == max(1, args.cases // 10):
            warm_mem = mem()
    end_mem = mem()
    growth = end_mem - (warm_mem if warm_mem is not None else end_mem)
    print(
        f"soak: {args.cases} cases on {args.device} in {time.time() - t0:.0f} s, {mismatches} mismatches; "
        f"memory {warm_mem:.1f} MB after 10% of the cases, {end_mem:.1f} MB at the end ({growth:+.1f} MB)"
    )
    return 1 if mismatches or growth > 64 else 0


if __name__ == "__main__":
    sys.exit(main())
