"""``compare --suite depth``: peak memory and step time of one training step (forward, backward, AdamW) against
depth."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ...report import MiB, by_model_and, mib, model_style, ok_memory, ok_time, pivot, pyplot, save_figure
from ...runner import Runner
from .common import base_spec

CPU = {"hidden_size": 128, "num_heads": 4, "seq_len": 1024, "depths": [2, 12, 24, 48], "steps": 3}
CUDA = {"hidden_size": 1024, "num_heads": 16, "seq_len": 4096, "depths": [2, 6, 12, 24, 48], "steps": 10}


def run(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Peak memory (one process per model and depth) and step time (one process per depth) against depth."""
    for depth in sizes["depths"]:
        specs = [base_spec(args, sizes, m, num_layers=depth) for m in args.models]
        for spec in specs:
            runner.memory(spec, "depth")
        if not args.skip_time:
            runner.time(specs, "depth", sizes["steps"])


def targets(res: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """Activation memory flat in depth: the peak grows by no more than the parameters, gradients and AdamW state."""
    rev = by_model_and(ok_memory(res.get("depth", [])), "num_layers").get("revformer", {})
    if len(rev) < 2:
        return []
    lo, hi = min(rev), max(rev)
    d_peak = rev[hi]["peak_bytes"] - rev[lo]["peak_bytes"]
    d_static = rev[hi]["static_bytes"] - rev[lo]["static_bytes"]
    return [((f"Activation memory flat in depth: peak({hi} layers) - peak({lo}) <= 1.05 x added "
              "param+grad+optimizer bytes"),
             (f"{d_peak / MiB:.1f} MiB vs {d_static / MiB:.1f} MiB added ({d_peak / d_static:.3f}x); "
              f"activation {mib(rev[lo]['activation_bytes'])} -> {mib(rev[hi]['activation_bytes'])} MiB"),
             "met" if d_peak <= 1.05 * d_static else "missed")]


def markdown(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    depth = ok_memory(res.get("depth", []))
    if not depth:
        return []
    s = depth[0]["spec"]
    table = by_model_and(depth, "num_layers")
    rows = sorted({r["spec"]["num_layers"] for r in depth})
    lines = [f"## Depth sweep (d={s['hidden_size']}, T={s['seq_len']}, {s['num_heads']} heads)", "",
             "Peak / activation memory (MiB):", ""]
    lines += pivot(rows, table, lambda r: f"{mib(r['peak_bytes'])} / {mib(r['activation_bytes'])}", "layers")
    timed = by_model_and(ok_time(res["depth"]), "num_layers")
    if timed:
        lines += ["", "Step time (s, median):", ""]
        lines += pivot(rows, timed, lambda r: f"{r['step_s']:.3f}", "layers")
    return lines + [""]


def plot(out: Path, res: dict[str, list[dict[str, Any]]]) -> None:
    plt = pyplot()
    depth = by_model_and(ok_memory(res.get("depth", [])), "num_layers")
    if depth:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for model, rows in depth.items():
            xs = sorted(rows)
            axes[0].plot(xs, [rows[x]["peak_bytes"] / MiB for x in xs], **model_style(model))
            axes[1].plot(xs, [rows[x]["activation_bytes"] / MiB for x in xs], **model_style(model))
        for ax, title in zip(axes, ("peak memory", "activation memory (peak - params, grads, AdamW state)")):
            ax.set(xlabel="layers", ylabel="MiB", title=title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        save_figure(fig, out / "memory_vs_depth.png")
    timed = by_model_and(ok_time(res.get("depth", [])), "num_layers")
    if timed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, rows in timed.items():
            xs = sorted(rows)
            ax.plot(xs, [rows[x]["step_s"] for x in xs], **model_style(model))
        ax.set(xlabel="layers", ylabel="seconds per training step (median)", title="step time vs depth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(fig, out / "step_time_vs_depth.png")
