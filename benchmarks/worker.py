"""Entry point of every fresh measurement process: ``python -m benchmarks.worker '<json payload>'``.

The payload's ``mode`` names the measurement; the worker prints its records as ``BENCH_RESULT <json>`` lines
(`benchmarks.runner` collects them).
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

# mode -> "module:function" taking the payload; imported on demand, so a worker loads only what it measures.
MODES = {
    "memory": "benchmarks.probes:memory_main",  # peak memory of one step (compare)
    "time": "benchmarks.probes:time_main",  # interleaved step times (compare)
    "breakdown": "benchmarks.probes:breakdown_main",  # which tensors hold the peak (breakdown)
    "train": "benchmarks.corpus:train_main",  # train and score bpb (quality, depth_quality)
    "lsh_memory": "benchmarks.suites.lsh:memory_worker",
    "conversion_memory": "benchmarks.suites.conversion:memory_worker",
    "length_probe": "benchmarks.suites.gpu_check:probe_worker",
    "fsdp": "benchmarks.suites.fsdp:worker",  # one rank, under torchrun
}


def run(payload: dict[str, Any]) -> None:
    """Run the measurement `payload["mode"]` in this process."""
    mode = payload["mode"]
    if mode not in MODES:
        raise ValueError(f"unknown worker mode {mode!r}")
    module, name = MODES[mode].split(":")
    getattr(importlib.import_module(module), name)(payload)


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
