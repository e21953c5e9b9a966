"""``compare --suite memory``: what a user compares. Peak memory of one forward+backward (no optimizer state to hide
activations) against length, and the longest sequence whose forward+backward fits a budget, for revformer as shipped,
each of its memory options alone, and the baselines (MEMORY_VARIANTS). Ratios are against the fairest baseline run:
Llama + checkpointing + chunked loss (what TRL or a fused/chunked linear cross-entropy gives users), else Llama +
checkpointing. The sizes' ``variants`` (a list of MEMORY_VARIANTS names) narrows the run to those variants."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

from ...report import MiB, ok_memory, pyplot, save_figure
from ...runner import Runner
from .common import base_spec, budget_bytes, record_summary
from .length import longest_sequence

CPU = {"hidden_size": 256, "num_heads": 4, "num_layers": 8, "vocab_size": 8192, "lengths": [4096, 8192, 16384],
       "max_len": {"revformer_no_chunking": 8192, "revformer_ff_chunks_only": 8192,
                   "revformer_loss_chunks_only": 8192},
       "longest": ["revformer", "llama", "llama_ckpt", "llama_ckpt_chunked", "reformer"], "budget_gib": 0.25, "start": 1024,
       "longest_max_len": 32768}
CUDA = {"hidden_size": 1024, "num_heads": 16, "num_layers": 12, "vocab_size": 32000,
        "lengths": [8192, 16384, 32768, 65536, 131072], "max_len": {"llama": 32768},
        "longest": ["revformer", "revformer_no_chunking", "llama", "llama_ckpt", "llama_ckpt_chunked", "reformer"],
        "budget_gib": None, "start": 8192, "longest_max_len": 2**21}

# What a user compares: revformer as shipped, each memory option alone, and the baselines.
MEMORY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "revformer": ("revformer", {}),  # RevformerConfig defaults
    "revformer_no_chunking": ("revformer", {"chunk": 0}),
    "revformer_ff_chunks_only": ("revformer", {"loss_chunk": 0}),
    "revformer_loss_chunks_only": ("revformer", {"ff_chunk": 0}),
    "revformer_bdia": ("revformer_bdia", {}),  # only when asked for (--models): not in DEFAULT_MODELS
    "llama": ("llama", {}),
    "llama_ckpt": ("llama_ckpt", {}),
    "llama_ckpt_chunked": ("llama_ckpt_chunked", {}),  # loss over models.LOSS_CHUNK-token chunks, recomputed
    "reformer": ("reformer", {}),
}
MEMORY_LABELS = {
    "revformer": "revformer, default config", "revformer_no_chunking": "revformer, no chunking",
    "revformer_ff_chunks_only": "revformer, FF chunks only", "revformer_loss_chunks_only": "revformer, loss chunks only",
    "revformer_bdia": "revformer, bdia coupling (gamma 1/16, fixed-point streams)",
    "llama": "Llama", "llama_ckpt": "Llama + checkpointing",
    "llama_ckpt_chunked": "Llama + checkpointing + chunked loss", "reformer": "HF Reformer (local, FF chunks)",
}


def variant_of(spec: dict[str, Any]) -> str | None:
    """The MEMORY_VARIANTS name of a spec (as stored in the JSON lines), if it is one."""
    for variant, (model, overrides) in MEMORY_VARIANTS.items():
        if spec["model"] == model and all(spec.get(k) == overrides.get(k) for k in ("chunk", "ff_chunk", "loss_chunk")):
            return variant
    return None


def run(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Memory of one forward+backward per variant and length, then the longest sequence at the budget."""
    variants = [v for v in MEMORY_VARIANTS if MEMORY_VARIANTS[v][0] in args.models
                and v in (sizes.get("variants") or MEMORY_VARIANTS)]
    for seq_len in sizes["lengths"]:
        for variant in variants:
            model, overrides = MEMORY_VARIANTS[variant]
            if seq_len > sizes["max_len"].get(variant, math.inf):
                continue
            spec = base_spec(args, sizes, model, seq_len=seq_len, **overrides)
            runner.memory(spec, "memory", with_optimizer=False, variant=variant)
    gib, budget = budget_bytes(args, sizes)
    for variant in [v for v in variants if v in sizes["longest"]]:
        model, overrides = MEMORY_VARIANTS[variant]
        spec = base_spec(args, sizes, model, **overrides)
        try:
            result = longest_sequence(runner, spec, sizes["start"], sizes["longest_max_len"], budget,
                                      suite="memory_probes", with_optimizer=False, variant=variant)
        except RuntimeError as exc:
            result = {"mode": "longest", "model": model, "ok": False, "error": str(exc)}
        result.update(suite="memory", variant=variant, spec=dataclasses.asdict(spec), device=args.device)
        record_summary(runner, "memory", result,
                       f"[memory] {variant}: longest {result.get('longest')} within {gib} GiB")


def memory_tables(records: list[dict[str, Any]]) -> tuple[dict[str, dict[int, int]], dict[str, dict[str, Any]]]:
    """From the memory suite: {variant: {length: growth bytes of one forward+backward}} and {variant: longest}."""
    growth: dict[str, dict[int, int]] = {}
    for r in ok_memory(records):
        growth.setdefault(variant_of(r["spec"]), {})[r["spec"]["seq_len"]] = r["growth_bytes"]
    longest = {r["variant"]: r for r in records if r.get("mode") == "longest" and "longest" in r}
    return growth, longest


def targets(res: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """Default revformer's forward+backward memory and longest sequence against Llama + checkpointing, and against
    Llama + checkpointing + chunked loss (the fair baseline)."""
    out: list[tuple[str, str, str]] = []
    growth, longest_at_budget = memory_tables(res.get("memory", []))
    base, rev = growth.get("llama_ckpt", {}), growth.get("revformer", {})
    for length in sorted(set(base) & set(rev)):
        ratio = rev[length] / base[length]
        target = 0.35 if length <= 4096 else None
        out.append((f"Default revformer's forward+backward memory at {length} tokens vs Llama + checkpointing"
                    + (f" <= {target}x" if target else ""),
                    f"{rev[length] / MiB:.0f} vs {base[length] / MiB:.0f} MiB ({ratio:.2f}x)",
                    ("met" if ratio <= target else "missed") if target else "info"))
    if longest_at_budget.get("revformer") and longest_at_budget.get("llama_ckpt"):
        rev_l, ck = longest_at_budget["revformer"]["longest"], longest_at_budget["llama_ckpt"]["longest"]
        out.append(("Longest forward+backward at equal budget >= 4x Llama + checkpointing (default revformer)",
                    f"{rev_l} vs {ck} tokens ({rev_l / max(ck, 1):.2f}x)", "met" if rev_l >= 4 * ck else "missed"))
    # The fair baseline (what users already run): checkpointing and a chunked loss, with the targets set against it:
    # <= 0.5x up to 4K tokens, <= 0.25x from 16K, and >= 3x the longest sequence at a budget.
    fair = growth.get("llama_ckpt_chunked", {})
    for length in sorted(set(fair) & set(rev)):
        ratio = rev[length] / fair[length]
        target = 0.5 if length <= 4096 else 0.25 if length >= 16384 else None
        figure = f"{rev[length] / MiB:.0f} vs {fair[length] / MiB:.0f} MiB ({ratio:.2f}x)"
        name = (f"Default revformer's forward+backward memory at {length} tokens vs Llama + checkpointing + chunked "
                f"loss" + (f" <= {target}x" if target else ""))
        out.append((name, figure, ("met" if ratio <= target else "missed") if target else "info"))
    if longest_at_budget.get("revformer") and longest_at_budget.get("llama_ckpt_chunked"):
        rev_l, ck = longest_at_budget["revformer"]["longest"], longest_at_budget["llama_ckpt_chunked"]["longest"]
        name = "Longest forward+backward at equal budget >= 3x Llama + checkpointing + chunked loss (default revformer)"
        status = "met" if rev_l >= 3 * ck else "missed"
        out.append((name, f"{rev_l} vs {ck} tokens ({rev_l / max(ck, 1):.2f}x)", status))
    return out


def baseline(table: dict[str, Any]) -> str:
    """The variant ratios are taken against: Llama + checkpointing + chunked loss where it ran, else + checkpointing."""
    return "llama_ckpt_chunked" if table.get("llama_ckpt_chunked") else "llama_ckpt"


def markdown(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    records = res.get("memory", [])
    growth, longest = memory_tables(records)
    if not growth:
        return []
    s = ok_memory(records)[0]["spec"]
    lengths = sorted({t for rows in growth.values() for t in rows})
    base_name = baseline(growth)
    base = growth.get(base_name, {})
    kv = s.get("num_kv_heads") or s["num_heads"]  # older records: no key/value head count (as many as heads)
    heads = f"{s['num_heads']} heads" + (f" / {kv} key-value heads" if kv != s["num_heads"] else "")
    lines = [(f"## What a user compares: memory of one forward+backward (d={s['hidden_size']}, {s['num_layers']} "
              f"layers, {heads}, vocabulary {s['vocab_size']}, batch {s['batch_size']}, {s.get('dtype', 'fp32')})"), "",
             ("Growth of peak memory during one forward+backward from zeroed gradients (activations + gradients; no "
              f"optimizer state), MiB, and its ratio to {MEMORY_LABELS[base_name]}. `-`: not run (too slow here)."),
             "", "| model | " + " | ".join(f"{t // 1024}K" for t in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for variant in MEMORY_VARIANTS:
        rows = growth.get(variant)
        if rows:
            cells = [(f"{rows[t] / MiB:.0f}" + (f" ({rows[t] / base[t]:.2f}x)" if t in base else "")) if t in rows
                     else "-" for t in lengths]
            lines.append(f"| {MEMORY_LABELS[variant]} | " + " | ".join(cells) + " |")
    if longest:
        budget = next(iter(longest.values())).get("budget_bytes")
        longest_base = baseline(longest)
        ck = longest.get(longest_base, {}).get("longest")
        lines += ["", f"Longest sequence whose forward+backward fits {budget / 2**30:g} GiB (doubling, then bisection):",
                  "", f"| model | longest | vs {MEMORY_LABELS[longest_base]} |", "|---|---|---|"]
        for variant, r in longest.items():
            cap = " (search cap)" if r.get("capped") else ""
            rel = f"{r['longest'] / ck:.2f}x" if ck else "-"
            lines.append(f"| {MEMORY_LABELS[variant]} | {r['longest']}{cap} | {rel} |")
    return lines + [""]


def plot(out: Path, res: dict[str, list[dict[str, Any]]]) -> None:
    growth, longest = memory_tables(res.get("memory", []))
    if not growth:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for i, (variant, rows) in enumerate((v, growth[v]) for v in MEMORY_VARIANTS if v in growth):
        xs = sorted(rows)
        axes[0].plot(xs, [rows[x] / MiB for x in xs], marker="os^v<>D*"[i % 8], color=f"C{i}",
                     linestyle="-" if variant.startswith("revformer") else "--", label=MEMORY_LABELS[variant])
    budget = next((r.get("budget_bytes") for r in longest.values() if r.get("budget_bytes")), None)
    if budget:
        axes[0].axhline(budget / MiB, color="grey", ls=":", label="budget of the right panel")
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="MiB",
                title="memory of one forward+backward")
    axes[0].grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    if longest:
        names = [v for v in MEMORY_VARIANTS if v in longest]
        axes[1].barh([MEMORY_LABELS[v] for v in names], [longest[v]["longest"] for v in names],
                     color=[f"C{list(MEMORY_VARIANTS).index(v)}" for v in names])
        axes[1].invert_yaxis()
        axes[1].tick_params(axis="y", labelsize=7)
        axes[1].set(xlabel="tokens", title=f"longest sequence within {budget / 2**30:g} GiB" if budget else
                    "longest sequence")
        axes[1].grid(alpha=0.3, axis="x")
    save_figure(fig, out / "memory_forward_backward.png")
