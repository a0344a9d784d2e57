"""Shared entry of the per-loss runners in bench/: each is
`python bench/bench_<loss>.py [bench options]`, the same as
`python -m fusedloss bench --loss <loss> [bench options]` (see --help).
Timing, CSV columns and the bytes formulas live in fusedloss/benchmark.py."""

import sys

from fusedloss.__main__ import main


def run_loss(loss: str) -> None:
    sys.exit(main(["bench", "--loss", loss, *sys.argv[1:]]))
