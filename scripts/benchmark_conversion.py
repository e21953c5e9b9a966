#!/usr/bin/env python
"""Conversion benchmark: pretrain a Llama teacher, convert it to revformer with each coupling, heal, fine-tune.

The entry point of `benchmarks.suites.conversion` (`python scripts/benchmark_conversion.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside revformer/
from benchmarks.suites.conversion import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
