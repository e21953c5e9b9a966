"""``compare --suite core``: reversible / plain step-time ratio at 12 layers (beside Llama +/- checkpointing) and
activation memory at 2/12/24 layers."""

from __future__ import annotations

import argparse
from typing import Any

from ...models import LABELS
from ...report import by_model_and, mib, ok_memory, ok_time, pivot
from ...runner import Runner
from .common import base_spec

CPU = {"hidden_size": 256, "num_heads": 4, "seq_len": 2048, "depths": [2, 12, 24], "time_depth": 12, "steps": 7}
CUDA = {"hidden_size": 1024, "num_heads": 16, "seq_len": 4096, "depths": [2, 12, 24], "time_depth": 12, "steps": 20}


def run(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Reversible vs plain: activation memory at a few depths, step time at one depth beside Llama +/- ckpt."""
    for depth in sizes["depths"]:
        for model in ("revformer", "revformer_plain"):
            runner.memory(base_spec(args, sizes, model, num_layers=depth), "core")
    models = [m for m in ("revformer", "revformer_plain", "llama_ckpt", "llama") if m in args.models]
    runner.time([base_spec(args, sizes, m, num_layers=sizes["time_depth"]) for m in models], "core", sizes["steps"])


def targets(res: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """The reversible step's cost against the plain step and against checkpointed Llama."""
    out: list[tuple[str, str, str]] = []
    times = {r["spec"]["model"]: r for r in ok_time(res.get("core", []))}
    if "revformer" in times and "revformer_plain" in times:
        ratio = times["revformer"]["step_s"] / times["revformer_plain"]["step_s"]
        depth = times["revformer"]["spec"]["num_layers"]
        out.append((f"Reversible step time <= 1.4x plain ({depth} layers)", f"{ratio:.2f}x",
                    "met" if ratio <= 1.4 else "missed"))
        if "llama_ckpt" in times:
            vs = times["revformer"]["step_s"] / times["llama_ckpt"]["step_s"]
            out.append(("Reversible no slower than checkpointed Llama", f"{vs:.2f}x checkpointed Llama's step time",
                        "met" if vs <= 1.0 else "missed"))
    return out


def markdown(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    core = res.get("core", [])
    core_mem = by_model_and(ok_memory(core), "num_layers")
    core_time = ok_time(core)
    if not core_mem and not core_time:
        return []
    s = (ok_memory(core) or core_time)[0]["spec"]
    lines = [f"## Core: reversible vs plain (d={s['hidden_size']}, T={s['seq_len']})", ""]
    if core_mem:
        rows = sorted({d for t in core_mem.values() for d in t})
        lines += ["Activation memory (MiB):", ""]
        lines += pivot(rows, core_mem, lambda r: mib(r["activation_bytes"]), "layers") + [""]
    if core_time:
        plain = next((r["step_s"] for r in core_time if r["spec"]["model"] == "revformer_plain"), None)
        lines += [(f"Step time at {core_time[0]['spec']['num_layers']} layers (median of "
                   f"{len(core_time[0]['step_times_s'])} steps, models interleaved in one process):"), "",
                  "| model | step (s) | vs plain | tokens/s |", "|---|---|---|---|"]
        for r in core_time:
            rel = f"{r['step_s'] / plain:.2f}x" if plain else "–"
            lines.append(f"| {LABELS[r['spec']['model']]} | {r['step_s']:.3f} | {rel} | {r['tokens_per_s']:.0f} |")
        lines.append("")
    return lines
