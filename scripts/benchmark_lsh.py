#!/usr/bin/env python
"""LSH attention measurements: causality/determinism checks and peak training memory.

The entry point of `benchmarks.suites.lsh` (`python scripts/benchmark_lsh.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside revformer/
from benchmarks.suites.lsh import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
