#!/usr/bin/env python
"""The whole GPU verification of revformer as one command, under a total time cap (default 8 minutes).

The entry point of `benchmarks.suites.gpu_check` (`python scripts/gpu_check.py --help`; `--dry-run` on the CPU).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside revformer/
from benchmarks.suites.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
