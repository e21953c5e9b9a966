"""``compare --suite length``: the longest trainable sequence per model (doubling, then bisection) under a memory budget
(CPU: peak RSS) or until real out-of-memory (CUDA); every probe is also a point of memory against length."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ...models import LABELS, STYLES, Spec
from ...report import MiB, by_model_and, model_style, pyplot, save_figure
from ...runner import Runner, describe
from .common import base_spec, budget_bytes, record_summary

CPU = {"hidden_size": 128, "num_heads": 4, "num_layers": 8, "start": 1024, "max_len": 65536, "budget_gib": 0.125}
CUDA = {"hidden_size": 1024, "num_heads": 16, "num_layers": 12, "start": 4096, "max_len": 2**21, "budget_gib": None}


def longest_sequence(runner: Runner, spec: Spec, start: int, max_len: int, budget: int | None,
                     quantum: int = 256, resolution: float = 0.25, suite: str = "length",
                     with_optimizer: bool = True, **tags: Any) -> dict[str, Any]:
    """Longest `seq_len` whose training step fits: double from `start`, then bisect to within `resolution`."""
    probes: dict[int, bool] = {}

    def fits(seq_len: int) -> bool:
        r = runner.memory(spec.replace(seq_len=seq_len), suite, budget, with_optimizer, probe=True, **tags)
        probes[seq_len] = bool(r.get("ok")) and not r.get("over_budget")
        if not r.get("ok") and not r.get("over_budget"):
            raise RuntimeError(f"probe failed: {describe(r)}")
        return probes[seq_len]

    lo, hi, length = 0, None, start
    while length <= max_len:
        if fits(length):
            lo, length = length, length * 2
        else:
            hi = length
            break
    if lo == 0 and hi is not None:  # even `start` does not fit: halve down
        while hi > quantum and not fits(hi // 2):
            hi //= 2
        lo = hi // 2 if hi > quantum else 0
    while hi is not None and lo and hi - lo > max(quantum, resolution * lo):
        mid = (lo + hi) // 2 // quantum * quantum
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return {"mode": "longest", "model": spec.model, "longest": lo, "first_failing": hi, "capped": hi is None,
            "max_len": max_len, "budget_bytes": budget, "probes": sorted(probes.items())}


def run(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Longest trainable sequence per model; every probe doubles as a point of memory against length."""
    _, budget = budget_bytes(args, sizes)
    if budget is None and args.device == "cpu":
        raise SystemExit("the length suite on CPU needs --memory-budget-gib")
    for model in args.models:
        spec = base_spec(args, sizes, model)
        try:
            result = longest_sequence(runner, spec, sizes["start"], sizes["max_len"], budget)
        except RuntimeError as exc:
            result = {"mode": "longest", "model": model, "ok": False, "error": str(exc)}
        result.update(suite="length", spec=dataclasses.asdict(spec), device=args.device)
        record_summary(runner, "length", result, f"[length] {model}: longest {result.get('longest')} "
                                                  f"(first failing {result.get('first_failing')})")


def targets(res: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """The longest sequence against Llama without and with checkpointing (and a chunked loss)."""
    out: list[tuple[str, str, str]] = []
    longest = {r["model"]: r for r in res.get("length", []) if r.get("mode") == "longest" and "longest" in r}
    if "revformer" in longest and "llama" in longest and longest["llama"]["longest"]:
        rev_l, base = longest["revformer"]["longest"], longest["llama"]["longest"]
        capped = " (reached the search cap)" if longest["revformer"].get("capped") else ""
        out.append(("Longest sequence >= 4x non-checkpointed Llama",
                    f"{rev_l} vs {base} tokens ({rev_l / base:.2f}x){capped}",
                    "met" if rev_l >= 4 * base else "missed"))
        if "llama_ckpt" in longest:
            ck = longest["llama_ckpt"]["longest"]
            out.append(("Longest sequence above checkpointed Llama",
                        f"{rev_l} vs {ck} tokens ({rev_l / max(ck, 1):.2f}x)", "met" if rev_l > ck else "missed"))
        if "llama_ckpt_chunked" in longest:  # the fair baseline: checkpointing and a chunked loss (figures only)
            ck = longest["llama_ckpt_chunked"]["longest"]
            out.append(("Longest sequence vs checkpointed Llama with a chunked loss",
                        f"{rev_l} vs {ck} tokens ({rev_l / max(ck, 1):.2f}x)", "info"))
    return out


def markdown(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    longest = [r for r in res.get("length", []) if r.get("mode") == "longest"]
    if not longest:
        return []
    s = longest[0]["spec"]
    budget = longest[0].get("budget_bytes")
    lines = [(f"## Longest trainable sequence (d={s['hidden_size']}, {s['num_layers']} layers, "
              f"{'budget ' + f'{budget / 2**30:g} GiB of peak RSS' if budget else 'until CUDA OOM'})"), "",
             "| model | longest | first failing | vs Llama | probes (length: fits) |", "|---|---|---|---|---|"]
    base = next((r.get("longest") for r in longest if r["model"] == "llama"), None)
    for r in longest:
        if "longest" not in r:
            lines.append(f"| {LABELS[r['model']]} | error | | | {r.get('error', '')[:80]} |")
            continue
        rel = f"{r['longest'] / base:.2f}x" if base else "–"
        probes = ", ".join(f"{t}:{'y' if ok else 'n'}" for t, ok in r["probes"])
        first = "> cap" if r["capped"] else r["first_failing"]
        lines.append(f"| {LABELS[r['model']]} | {r['longest']} | {first} | {rel} | {probes} |")
    return lines + [""]


def plot(out: Path, res: dict[str, list[dict[str, Any]]]) -> None:
    probes = [r for r in res.get("length", []) if r.get("mode") == "memory" and "peak_bytes" in r]
    if not probes:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, rows in by_model_and(probes, "seq_len").items():
        fit = sorted(x for x in rows if not rows[x].get("over_budget"))
        ax.plot(fit, [rows[x]["peak_bytes"] / MiB for x in fit], **model_style(model))
        over = sorted(x for x in rows if rows[x].get("over_budget"))  # stopped early: memory when stopped
        ax.plot(over, [rows[x]["peak_bytes"] / MiB for x in over], "x", color=STYLES[model][0])
    budget = next((r.get("budget_bytes") for r in probes if r.get("budget_bytes")), None)
    if budget:
        ax.axhline(budget / MiB, color="grey", ls="--", label="budget")
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="peak MiB (x: over budget, stopped)",
           title="memory vs length (one training step)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out / "memory_vs_length.png")
