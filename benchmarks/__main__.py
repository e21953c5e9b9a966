"""``python -m benchmarks SUITE [options]``: run one benchmark suite from the checkout root (``--help``: the list)."""

import sys

from .suites import main

if __name__ == "__main__":
    sys.exit(main())
