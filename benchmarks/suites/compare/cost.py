"""``compare --suite cost``: training-step time of revformer with its default memory options against none and each
option alone; the four are stepped round-robin in one process, so their ratios share the machine's noise.

The sizes' ``variants`` (MEMORY_VARIANTS names) replaces the four, e.g. revformer against the fair baseline at a Hub
shape: ``--shape smollm2-135m --set 'cost.variants=["revformer","llama_ckpt_chunked"]' --set cost.seq_len=4096``."""

from __future__ import annotations

import argparse
from typing import Any

from ...report import ok_time
from ...runner import Runner
from .common import base_spec
from .memory import FAIR, MEMORY_LABELS, MEMORY_VARIANTS, variant_of

CPU = {"hidden_size": 256, "num_heads": 4, "num_layers": 12, "vocab_size": 8192, "seq_len": 4096, "steps": 7}
CUDA = {"hidden_size": 1024, "num_heads": 16, "num_layers": 12, "vocab_size": 32000, "seq_len": 8192, "steps": 10}
VARIANTS = ("revformer", "revformer_no_chunking", "revformer_ff_chunks_only", "revformer_loss_chunks_only")
# (variant, baseline, the most its step time may be as a multiple of the baseline's (None: figure only), target).
STEP_TARGETS = (
    ("revformer", "revformer_no_chunking", 1.03, "Default memory options cost <= 3% of a training step"),
    ("revformer", FAIR, 1.1, f"Default revformer's step time <= 1.1x {MEMORY_LABELS[FAIR]}"),
    ("revformer_bdia", FAIR, None, f"{MEMORY_LABELS['revformer_bdia']}: step time vs {MEMORY_LABELS[FAIR]}"),
)


def run(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    variants = sizes.get("variants") or VARIANTS
    unknown = [v for v in variants if v not in MEMORY_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown cost.variants {unknown}; choose from {list(MEMORY_VARIANTS)}")
    runner.time([base_spec(args, sizes, MEMORY_VARIANTS[v][0], **MEMORY_VARIANTS[v][1]) for v in variants], "cost",
                sizes["steps"])


def targets(res: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """Step time of revformer against its options switched off (at most 3% slower) and against the fair baseline,
    Llama + checkpointing + chunked loss (at most 1.1x), timed in one process."""
    cost = {variant_of(r["spec"]): r for r in ok_time(res.get("cost", []))}
    out = []
    for variant, base, limit, name in STEP_TARGETS:
        if variant not in cost or base not in cost:
            continue
        ratio = cost[variant]["step_s"] / cost[base]["step_s"]
        s = cost[variant]["spec"]
        out.append((f"{name} ({s['num_layers']} layers, d={s['hidden_size']}, T={s['seq_len']})",
                    f"{cost[variant]['step_s']:.2f} s vs {cost[base]['step_s']:.2f} s ({ratio:.2f}x, {ratio - 1:+.1%})",
                    "info" if limit is None else "met" if ratio <= limit else "missed"))
    return out


def markdown(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    cost = ok_time(res.get("cost", []))
    if not cost:
        return []
    s = cost[0]["spec"]
    steps = {variant_of(r["spec"]): r["step_s"] for r in cost}
    bases = [b for b in ("revformer_no_chunking", FAIR) if b in steps]
    lines = [(f"## Cost of the memory options (training step, {s['num_layers']} layers, d={s['hidden_size']}, "
              f"T={s['seq_len']}, vocabulary {s['vocab_size']}; median of {len(cost[0]['step_times_s'])} steps, "
              "interleaved)"), "",
             "| configuration | step (s) | " + " | ".join(f"vs {MEMORY_LABELS[b]}" for b in bases) + " |",
             "|---" * (2 + len(bases)) + "|"]
    for r in cost:
        rel = [f"{r['step_s'] / steps[b] - 1:+.1%}" for b in bases]
        lines.append(f"| {MEMORY_LABELS[variant_of(r['spec'])]} | {r['step_s']:.3f} | " + " | ".join(rel) + " |")
    return lines + [""]
