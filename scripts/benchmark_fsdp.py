#!/usr/bin/env python
"""Per-rank memory of FSDP2 training with 1 and 2 ranks, for a model whose parameters dominate memory.

The entry point of `benchmarks.suites.fsdp` (`python scripts/benchmark_fsdp.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside revformer/
from benchmarks.suites.fsdp import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
