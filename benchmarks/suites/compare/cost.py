"""``compare --suite cost``: training-step time of revformer with its default memory options against none and each
option alone; the four are stepped round-robin in one process, so their ratios share the machine's noise."""

from __future__ import annotations

import argparse
from typing import Any

from ...report import ok_time
from ...runner import Runner
from .common import base_spec
from .memory import MEMORY_LABELS, MEMORY_VARIANTS, variant_of

CPU = {"hidden_size": 256, "num_heads": 4, "num_layers": 12, "vocab_size": 8192, "seq_len": 4096, "steps": 7}
CUDA = {"hidden_size": 1024, "num_heads": 16, "num_layers": 12, "vocab_size": 32000, "seq_len": 8192, "steps": 10}
VARIANTS = ("revformer", "revformer_no_chunking", "revformer_ff_chunks_only", "revformer_loss_chunks_only")


def run(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    runner.time([base_spec(args, sizes, MEMORY_VARIANTS[v][0], **MEMORY_VARIANTS[v][1]) for v in VARIANTS], "cost",
                sizes["steps"])


def targets(res: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """The default memory options cost at most 3% of a training step."""
    cost = {variant_of(r["spec"]): r for r in ok_time(res.get("cost", []))}
    if "revformer" not in cost or "revformer_no_chunking" not in cost:
        return []
    ratio = cost["revformer"]["step_s"] / cost["revformer_no_chunking"]["step_s"]
    s = cost["revformer"]["spec"]
    return [(f"Default memory options cost <= 3% of a training step ({s['num_layers']} layers, "
             f"d={s['hidden_size']}, T={s['seq_len']})",
             f"{cost['revformer']['step_s']:.2f} s vs {cost['revformer_no_chunking']['step_s']:.2f} s "
             f"({ratio - 1:+.1%})", "met" if ratio <= 1.03 else "missed")]


def markdown(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    cost = ok_time(res.get("cost", []))
    if not cost:
        return []
    s = cost[0]["spec"]
    base = next((r["step_s"] for r in cost if variant_of(r["spec"]) == "revformer_no_chunking"), None)
    lines = [(f"## Cost of the memory options (training step, {s['num_layers']} layers, d={s['hidden_size']}, "
              f"T={s['seq_len']}, vocabulary {s['vocab_size']}; median of {len(cost[0]['step_times_s'])} steps, "
              "interleaved)"), "", "| configuration | step (s) | vs no chunking |", "|---|---|---|"]
    for r in cost:
        rel = f"{r['step_s'] / base - 1:+.1%}" if base else "-"
        lines.append(f"| {MEMORY_LABELS[variant_of(r['spec'])]} | {r['step_s']:.3f} | {rel} |")
    return lines + [""]
