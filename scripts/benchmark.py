#!/usr/bin/env python
"""Memory, speed, longest sequence and quality of revformer against standard baselines: the entry point of
`benchmarks.cli` (suites in benchmarks/suites/; `python scripts/benchmark.py --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside revformer/
from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
