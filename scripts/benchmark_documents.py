#!/usr/bin/env python
"""Cost of data.document_attention: forward+backward on packed blocks, with and without document positions.

The entry point of `benchmarks.suites.documents` (`python scripts/benchmark_documents.py --help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside revformer/
from benchmarks.suites.documents import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
