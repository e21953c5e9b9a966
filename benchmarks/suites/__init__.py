"""One module per benchmark. The suites of ``scripts/benchmark.py`` (depth, core, length, longseq, quality, memory,
cost) each give their default sizes (``CPU``, ``CUDA``), ``run(runner, args, sizes)`` and the parts of the results
README they own (``markdown``, ``targets``, ``plot``); ``benchmarks.cli`` strings them together. The others
(fixed_point, lsh, torch_compile, fsdp, documents, data, conversion, depth_quality, gpu_check) each have a
``main(argv)`` behind their script in ``scripts/``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..models import Spec, spec_from
from ..report import append_jsonl
from ..runner import Runner


def base_spec(args: argparse.Namespace, sizes: dict[str, Any], model: str = "revformer", **overrides: Any) -> Spec:
    """The Spec of `model` at a suite's sizes, on the command line's device, dtype and threads."""
    return spec_from(sizes, model, device=args.device, dtype=args.dtype, threads=args.threads, **overrides)


def budget_bytes(args: argparse.Namespace, sizes: dict[str, Any]) -> tuple[float | None, int | None]:
    """The memory budget in GiB (`--memory-budget-gib`, else the suite's `budget_gib`) and in bytes."""
    gib = args.memory_budget_gib if args.memory_budget_gib is not None else sizes["budget_gib"]
    return gib, int(gib * 2**30) if gib else None


def record_summary(runner: Runner, suite: str, record: dict[str, Any], message: str) -> None:
    """Append a parent-side record (a longest-sequence search) to the suite's JSON lines and log it."""
    append_jsonl(runner.out / f"{suite}.jsonl", [record])
    print(message, file=sys.stderr, flush=True)

