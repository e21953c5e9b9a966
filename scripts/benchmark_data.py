#!/usr/bin/env python
"""Measure the data pipeline on the embedded stdlib corpus: sizes, BPE training time, tokenization throughput.

The entry point of `benchmarks.suites.data` (`python scripts/benchmark_data.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside revformer/
from benchmarks.suites.data import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
