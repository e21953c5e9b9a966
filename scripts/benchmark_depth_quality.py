#!/usr/bin/env python
"""Quality against depth: revformer and a Llama of equal parameters on the same tokens.

The entry point of `benchmarks.suites.depth_quality` (`python scripts/benchmark_depth_quality.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside revformer/
from benchmarks.suites.depth_quality import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
