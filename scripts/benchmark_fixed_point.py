#!/usr/bin/env python
"""Fixed-point vs float residual streams under bf16 compute: reconstruction error, gradient error, step time.

The entry point of `benchmarks.suites.fixed_point` (`python scripts/benchmark_fixed_point.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside revformer/
from benchmarks.suites.fixed_point import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
