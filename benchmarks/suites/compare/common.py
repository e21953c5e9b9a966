"""What the parts of the compare suite share: the model spec at a part's sizes, the memory budget, and records the
parent process writes itself."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ...models import Spec, spec_from
from ...report import append_jsonl
from ...runner import Runner


def base_spec(args: argparse.Namespace, sizes: dict[str, Any], model: str = "revformer", **overrides: Any) -> Spec:
    """The Spec of `model` at a part's sizes, on the command line's device, dtype and threads."""
    return spec_from(sizes, model, device=args.device, dtype=args.dtype, threads=args.threads, **overrides)


def budget_bytes(args: argparse.Namespace, sizes: dict[str, Any]) -> tuple[float | None, int | None]:
    """The memory budget in GiB (`--memory-budget-gib`, else the part's `budget_gib`) and in bytes."""
    gib = args.memory_budget_gib if args.memory_budget_gib is not None else sizes["budget_gib"]
    return gib, int(gib * 2**30) if gib else None


def record_summary(runner: Runner, suite: str, record: dict[str, Any], message: str) -> None:
    """Append a parent-side record (a longest-sequence search) to the part's JSON lines and log it."""
    append_jsonl(runner.out / f"{suite}.jsonl", [record])
    print(message, file=sys.stderr, flush=True)
