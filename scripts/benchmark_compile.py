#!/usr/bin/env python
"""Training step time with torch.compile of each sublayer (train.compile: true) against eager, and gradients.

The entry point of `benchmarks.suites.torch_compile` (`python scripts/benchmark_compile.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside revformer/
from benchmarks.suites.torch_compile import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
