#!/usr/bin/env bash
# The GPU check as one command (see benchmarks/suites/gpu_check.py): CUDA tests, benchmark suites in bf16, length targets
# and MFU, under an 8-minute cap; results in benchmarks/results/cuda/<gpu name>/. `--dry-run` rehearses on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m benchmarks gpu_check "$@"
