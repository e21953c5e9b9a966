"""``compare --suite memory``: what a user compares. Activation memory of one forward+backward (no optimizer state to
hide activations) against length, and the longest sequence whose forward+backward fits a budget, for revformer as
shipped, each of its memory options alone, and the baselines (MEMORY_VARIANTS). Ratios are against the fairest
baseline run: Llama + checkpointing + chunked loss (what TRL or a fused/chunked linear cross-entropy gives users),
else Llama + checkpointing. The sizes' ``variants`` (a list of MEMORY_VARIANTS names) narrows the run to those
variants.

Which number (`activation`, used by every table, plot and target): a record's profiler ``activation_peak_bytes``
where it has one, else its peak growth minus the gradients alive at the peak (MemTracker's breakdown), else its peak
growth (activations + gradients: CUDA without the profiler field).

``depths`` (two layer counts, e.g. ``[2, 4]``): for shapes too big to run at full depth, every variant and length is
measured at those two depths and its memory extrapolated linearly (slope per layer, intercept) to the shape's
``num_layers``; tables, targets and the JSON summary record (mode ``memory_summary``) say so.

Llama + checkpointing offloaded to host (``llama_ckpt_offload``: transformers'
``activation_checkpointing_enable(offload=True)``, with the chunked loss) runs on CUDA only, once
``benchmarks.models`` builds it; elsewhere the report computes what offload would move off the device and the copy
time it adds (`offload_figures`), labelled computed."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...models import MODELS
from ...report import MiB, ok_memory, pyplot, read_records, save_figure
from ...runner import Runner
from .common import base_spec, budget_bytes, record_summary
from .length import longest_sequence

CPU = {"hidden_size": 256, "num_heads": 4, "num_layers": 8, "vocab_size": 8192, "lengths": [4096, 8192, 16384],
       "max_len": {"revformer_no_chunking": 8192, "revformer_ff_chunks_only": 8192,
                   "revformer_loss_chunks_only": 8192},
       "longest": ["revformer", "revformer_bdia", "llama", "llama_ckpt", "llama_ckpt_chunked", "reformer"],
       "budget_gib": 0.25, "start": 1024, "longest_max_len": 32768, "depths": None}
CUDA = {"hidden_size": 1024, "num_heads": 16, "num_layers": 12, "vocab_size": 32000,
        "lengths": [8192, 16384, 32768, 65536, 131072], "max_len": {"llama": 32768},
        "longest": ["revformer", "revformer_bdia", "revformer_no_chunking", "llama", "llama_ckpt", "llama_ckpt_chunked",
                    "llama_ckpt_offload", "reformer"],
        "budget_gib": None, "start": 8192, "longest_max_len": 2**21, "depths": None}

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
    "llama_ckpt_offload": ("llama_ckpt_offload", {}),  # CUDA only, once benchmarks.models builds it
    "reformer": ("reformer", {}),
}
MEMORY_LABELS = {
    "revformer": "revformer, default config", "revformer_no_chunking": "revformer, no chunking",
    "revformer_ff_chunks_only": "revformer, FF chunks only", "revformer_loss_chunks_only": "revformer, loss chunks only",
    "revformer_bdia": "revformer, bdia coupling (gamma 1/16, fixed-point streams)",
    "llama": "Llama", "llama_ckpt": "Llama + checkpointing",
    "llama_ckpt_chunked": "Llama + checkpointing + chunked loss",
    "llama_ckpt_offload": "Llama + checkpointing offloaded to host + chunked loss",
    "reformer": "HF Reformer (local, FF chunks)",
}
FAIR = "llama_ckpt_chunked"  # the fair baseline: what users already run
OFFLOAD = "llama_ckpt_offload"

# Which number: the measures `activation` picks from, best first.
MEASURES = {
    "activation_peak": "activation peak (profiler: live tensors other than parameters and gradients)",
    "growth_minus_gradients": "peak growth minus the gradients alive at the peak",
    "growth": "peak growth, gradients included",
}

# Targets against the baselines, table-driven. (variant, baseline, tokens) -> the most its activation memory may be
# as a multiple of the baseline's; the pairs of COMPARED at other lengths are shown as figures ("info"). Set at
# SmolLM2-135M's shape (`--shape smollm2-135m`); at other shapes they are judged alike, the shape in the name.
COMPARED = (("revformer", FAIR), ("revformer_bdia", FAIR), ("revformer", "llama_ckpt"))
RATIO_TARGETS = {("revformer_bdia", FAIR, 16384): 0.35, ("revformer", FAIR, 16384): 0.25,
                 ("revformer_bdia", FAIR, 4096): 0.5, ("revformer", FAIR, 4096): 0.5}
LONGEST_TARGETS = {("revformer", FAIR): 3.0, ("revformer_bdia", FAIR): 3.0}  # longest within the budget, at least
LONGEST_BUDGET_GIB = 4  # the computed longest sequence: parameters, gradients and activations within this
DEPTH_GROWTH_TARGET = ("revformer", 0.05)  # activation memory from the fewest layers measured to full depth, at most
BASELINE_NOTES = {"llama_ckpt": " (no chunked loss: full logits)"}

# Computed offload figures: element sizes of the checkpointed layer inputs, and the host link's bandwidth each way.
OFFLOAD_ELEMENT_BYTES = {"fp32": 4, "bf16": 2}
OFFLOAD_BANDWIDTH = 50e9  # bytes/s each way: PCIe 5.0 x16 (64 GB/s raw per direction, ~50 GB/s achieved)
OFFLOAD_LINK = "PCIe 5.0 x16, ~50 GB/s each way"


def variant_of(spec: dict[str, Any]) -> str | None:
    """The MEMORY_VARIANTS name of a spec (as stored in the JSON lines), if it is one."""
    for variant, (model, overrides) in MEMORY_VARIANTS.items():
        if spec["model"] == model and all(spec.get(k) == overrides.get(k) for k in ("chunk", "ff_chunk", "loss_chunk")):
            return variant
    return None


def activation(record: dict[str, Any]) -> tuple[int, str]:
    """The activation memory of a memory record and which measure (a MEASURES key) it is: the profiler's
    `activation_peak_bytes` where the record has it, else peak growth minus the gradients alive at the peak
    (MemTracker's breakdown), else peak growth."""
    if record.get("activation_peak_bytes") is not None:
        return record["activation_peak_bytes"], "activation_peak"
    gradients = (record.get("memtracker_breakdown") or {}).get("Gradient")
    if gradients is not None:
        return record["growth_bytes"] - gradients, "growth_minus_gradients"
    return record["growth_bytes"], "growth"


@dataclass
class Figure:
    """Activation memory of one variant at one length at the shape's full depth (`layers`): measured there, or
    extrapolated linearly from the depths measured (`measured`: layers -> bytes)."""

    layers: int
    measured: dict[int, int]
    measures: set[str]  # MEASURES keys of the records (one, unless records of different workers are mixed)
    spec: dict[str, Any]
    param_bytes: dict[int, int] = dataclasses.field(default_factory=dict)  # layers -> parameter bytes

    @property
    def full_param_bytes(self) -> float | None:
        """Parameter bytes at full depth: recorded there, else on the line through the depths recorded (exact:
        every layer has the same parameters)."""
        if self.layers in self.param_bytes:
            return self.param_bytes[self.layers]
        if len(self.param_bytes) < 2:
            return None
        (d1, p1), (d2, p2) = sorted(self.param_bytes.items())[-2:]
        return p1 + (p2 - p1) / (d2 - d1) * (self.layers - d1)

    @property
    def measure(self) -> str:
        """Which measure the figure is, described."""
        return " / ".join(MEASURES[k] for k in MEASURES if k in self.measures)

    @property
    def extrapolated(self) -> bool:
        return self.layers not in self.measured

    @property
    def slope(self) -> float | None:
        """Bytes per layer: the least-squares line through the measured depths (the line through two of them)."""
        if len(self.measured) < 2:
            return None
        n = len(self.measured)
        mx, my = sum(self.measured) / n, sum(self.measured.values()) / n
        return (sum((x - mx) * (y - my) for x, y in self.measured.items())
                / sum((x - mx) ** 2 for x in self.measured))

    @property
    def intercept(self) -> float | None:
        """Bytes at zero layers on that line."""
        slope = self.slope
        if slope is None:
            return None
        return sum(self.measured.values()) / len(self.measured) - slope * sum(self.measured) / len(self.measured)

    @property
    def bytes(self) -> float:
        """At full depth: measured, else the line's value there."""
        if not self.extrapolated:
            return self.measured[self.layers]
        if self.slope is None:
            raise ValueError(f"one depth measured ({list(self.measured)}), none at full depth ({self.layers})")
        return self.intercept + self.slope * self.layers

    @property
    def source(self) -> str:
        """'extrapolated from N and M layers', or '' when measured at full depth."""
        if not self.extrapolated:
            return ""
        depths = sorted(self.measured)
        return f"extrapolated from {', '.join(map(str, depths[:-1]))} and {depths[-1]} layers"

    def summary(self) -> dict[str, Any]:
        """The figure as stored in the JSON summary record."""
        return {"layers": self.layers, "bytes": round(self.bytes), "measure": sorted(self.measures),
                "measured": sorted(self.measured.items()), "extrapolated": self.extrapolated,
                "extrapolated_from": sorted(self.measured) if self.extrapolated else None, "source": self.source,
                "slope_bytes_per_layer": self.slope, "intercept_bytes": self.intercept}


def figures(records: list[dict[str, Any]]) -> dict[str, dict[int, Figure]]:
    """{variant: {length: Figure}} of the memory records that ran and fit. The full depth is the record's
    `full_layers` (the shape's num_layers, tagged by `run`), else the deepest depth measured."""
    table: dict[str, dict[int, Figure]] = {}
    for r in ok_memory(records):
        variant = r.get("variant") or variant_of(r["spec"])
        if variant is None:  # a model no variant names (the depth suite's revformer_plain)
            continue
        value, measure = activation(r)
        layers = r["spec"]["num_layers"]
        full = r.get("full_layers") or layers
        fig = table.setdefault(variant, {}).setdefault(r["spec"]["seq_len"], Figure(full, {}, set(), r["spec"]))
        fig.measured[layers] = value
        fig.measures.add(measure)
        if r.get("param_bytes"):
            fig.param_bytes[layers] = r["param_bytes"]
        fig.layers = max(fig.layers, full)
    return table


def memory_tables(records: list[dict[str, Any]]) -> tuple[dict[str, dict[int, Figure]], dict[str, dict[str, Any]]]:
    """From the memory suite: {variant: {length: Figure}} and {variant: longest-sequence record}."""
    longest = {r["variant"]: r for r in records if r.get("mode") == "longest" and "longest" in r}
    return figures(records), longest


def measures_used(table: dict[str, dict[int, Figure]]) -> str:
    """The measures behind a table's figures, described."""
    used = {m for rows in table.values() for f in rows.values() for m in f.measures}
    return "; ".join(MEASURES[k] for k in MEASURES if k in used)


def offload_figures(layers: int, batch: int, tokens: int, hidden: int,
                    bandwidth: float = OFFLOAD_BANDWIDTH) -> dict[str, dict[str, float]]:
    """Computed, not measured: what activation checkpointing with offload moves off the device per step, the inputs
    checkpointing keeps (one per checkpointed layer: layers x batch x tokens x hidden elements), in fp32 and bf16, and
    the copy time it adds: out to the host in forward and back in backward, each at `bandwidth` bytes/s."""
    out: dict[str, dict[str, float]] = {}
    for dtype, size in OFFLOAD_ELEMENT_BYTES.items():
        moved = layers * batch * tokens * hidden * size
        out[dtype] = {"bytes": moved, "copy_s": 2 * moved / bandwidth}
    return out


def offload_rows(table: dict[str, dict[int, Figure]]) -> list[dict[str, Any]]:
    """Computed offload figures at every length the fair baseline ran (at full depth), unless offload was measured."""
    if table.get(OFFLOAD) or not table.get(FAIR):
        return []
    rows = []
    for length, fig in sorted(table[FAIR].items()):
        s = fig.spec
        rows.append({"seq_len": length, "layers": fig.layers, "batch_size": s["batch_size"],
                     "hidden_size": s["hidden_size"], "bandwidth_bytes_per_s": OFFLOAD_BANDWIDTH, "link": OFFLOAD_LINK,
                     "baseline_bytes": round(fig.bytes), "baseline_source": fig.source,
                     **offload_figures(fig.layers, s["batch_size"], length, s["hidden_size"])})
    return rows


def longest_computed(rows: dict[int, Figure], budget: int) -> dict[str, Any] | None:
    """The longest sequence whose forward+backward fits `budget` bytes (parameters, their gradients and the
    activations), computed, not searched: activation memory is linear in length for every variant here (no kernel
    holds a tokens x tokens matrix; the loss chunk is a constant), so the line through the two longest lengths
    measured gives it. None without two lengths or parameter sizes."""
    if len(rows) < 2:
        return None
    (t1, f1), (t2, f2) = sorted(rows.items())[-2:]
    params = f2.full_param_bytes
    if params is None:
        return None
    per_token = (f2.bytes - f1.bytes) / (t2 - t1)
    fixed = f1.bytes - per_token * t1
    free = budget - 2 * params - fixed
    longest = int(free / per_token) if per_token > 0 and free > 0 else 0
    return {"longest": longest, "bytes_per_token": per_token, "fixed_bytes": fixed, "param_bytes": params,
            "from_lengths": [t1, t2], "budget_bytes": budget,
            "extrapolated": f1.extrapolated or f2.extrapolated, "source": f2.source}


def longest_table(table: dict[str, dict[int, Figure]], budget: int | None) -> dict[str, dict[str, Any]]:
    """{variant: longest_computed} for every variant with two lengths, at `budget` (LONGEST_BUDGET_GIB if None)."""
    budget = budget or int(LONGEST_BUDGET_GIB * 2**30)
    found = {v: longest_computed(rows, budget) for v, rows in table.items()}
    return {v: r for v, r in found.items() if r is not None}


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON summary record of a memory run: every figure (measured or extrapolated, with its slope and
    intercept), the measure behind it, and the computed offload figures."""
    table = figures(records)
    return {"mode": "memory_summary", "ok": True, "measures": MEASURES,
            "figures": [{"variant": v, "seq_len": t, **f.summary()} for v, rows in table.items()
                        for t, f in sorted(rows.items())],
            "offload_computed": offload_rows(table), "longest_computed": longest_table(table, None)}


def selected(args: argparse.Namespace, sizes: dict[str, Any]) -> list[str]:
    """The variants to run: those whose model is among --models (on CUDA, the offload baseline with the fair one,
    once benchmarks.models builds it; never on CPU, where the host copy is the same memory), narrowed by the sizes'
    `variants`."""
    cuda = args.device.startswith("cuda")
    models = set(args.models) | ({OFFLOAD} if cuda and FAIR in args.models and OFFLOAD in MODELS else set())
    return [v for v in MEMORY_VARIANTS if MEMORY_VARIANTS[v][0] in models
            and v in (sizes.get("variants") or MEMORY_VARIANTS) and (cuda or v != OFFLOAD)]


def run(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Memory of one forward+backward per variant and length (at the two `depths` when given), then the longest
    sequence at the budget (at full depth), then the JSON summary record."""
    variants = selected(args, sizes)
    full = sizes["num_layers"]
    depths = sizes.get("depths") or [full]
    if sizes.get("depths") and (len(set(depths)) != 2 or min(depths) < 1):
        raise SystemExit(f"memory.depths must be two different layer counts, not {depths}")
    for seq_len in sizes["lengths"]:
        for variant in variants:
            model, overrides = MEMORY_VARIANTS[variant]
            if seq_len > sizes["max_len"].get(variant, math.inf):
                continue
            for depth in depths:
                spec = base_spec(args, sizes, model, seq_len=seq_len, num_layers=depth, **overrides)
                runner.memory(spec, "memory", with_optimizer=False, variant=variant, full_layers=full)
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
    done = summary(read_records(runner.out / "memory.jsonl"))
    extrapolated = sum(f["extrapolated"] for f in done["figures"])
    record_summary(runner, "memory", {**done, "suite": "memory", "device": args.device},
                   f"[memory] summary: {len(done['figures'])} figures, {extrapolated} extrapolated to {full} layers")


# ----------------------------------------------------------------------------------------------------- targets


def status(ok: bool, limit: float | None) -> str:
    return "info" if limit is None else "met" if ok else "missed"


def shape_of(fig: Figure) -> str:
    s = fig.spec
    return f"d={s['hidden_size']}, {fig.layers} layers" + (f", {fig.source}" if fig.extrapolated else "")


def depth_growth(res: dict[str, list[dict[str, Any]]], variant: str) -> list[tuple[int, Figure]]:
    """(length, Figure) of `variant` wherever two or more depths were measured: the memory suite's (`depths`), else
    the depth suite's (training steps at its own sizes)."""
    for suite in ("memory", "depth"):
        rows = figures(res.get(suite, [])).get(variant, {})
        found = [(t, f) for t, f in sorted(rows.items()) if len(f.measured) >= 2]
        if found:
            return found
    return []


def targets(res: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """Revformer's activation memory and longest sequence against the baselines (RATIO_TARGETS, LONGEST_TARGETS; the
    pairs of COMPARED at other lengths as figures), and its activation memory's growth with depth."""
    out: list[tuple[str, str, str]] = []
    table, longest = memory_tables(res.get("memory", []))
    for variant, base in COMPARED:
        ours, theirs = table.get(variant, {}), table.get(base, {})
        for length in sorted(set(ours) & set(theirs)):
            a, b = ours[length], theirs[length]
            limit = RATIO_TARGETS.get((variant, base, length))
            ratio = a.bytes / b.bytes
            name = (f"{MEMORY_LABELS[variant]}: activation memory at {length} tokens vs {MEMORY_LABELS[base]}"
                    f"{BASELINE_NOTES.get(base, '')}" + (f" <= {limit}x" if limit else "") + f" ({shape_of(a)})")
            extrapolated = " (extrapolated)" if a.extrapolated or b.extrapolated else ""
            figure = f"{a.bytes / MiB:.0f} vs {b.bytes / MiB:.0f} MiB ({ratio:.2f}x){extrapolated}; {a.measure}"
            out.append((name, figure, status(ratio <= (limit or 0), limit)))
        if longest.get(variant) and longest.get(base):
            limit = LONGEST_TARGETS.get((variant, base))
            ours_l, theirs_l = longest[variant]["longest"], longest[base]["longest"]
            gib = (longest[variant].get("budget_bytes") or 0) / 2**30
            name = (f"{MEMORY_LABELS[variant]}: longest forward+backward within {gib:g} GiB vs {MEMORY_LABELS[base]}"
                    f"{BASELINE_NOTES.get(base, '')}" + (f" >= {limit:g}x" if limit else ""))
            ratio = ours_l / max(theirs_l, 1)
            out.append((name, f"{ours_l} vs {theirs_l} tokens ({ratio:.2f}x)", status(ratio >= (limit or 0), limit)))
    computed = longest_table(table, None)
    for (variant, base), limit in LONGEST_TARGETS.items():
        if variant in computed and base in computed:
            ours_c, theirs_c = computed[variant], computed[base]
            ratio = ours_c["longest"] / max(theirs_c["longest"], 1)
            name = (f"{MEMORY_LABELS[variant]}: longest forward+backward within {LONGEST_BUDGET_GIB} GiB (parameters, "
                    f"gradients, activations; computed from {ours_c['from_lengths']} tokens) vs {MEMORY_LABELS[base]} "
                    f">= {limit:g}x")
            extrapolated = " (extrapolated in depth)" if ours_c["extrapolated"] or theirs_c["extrapolated"] else ""
            out.append((name, f"{ours_c['longest']} vs {theirs_c['longest']} tokens ({ratio:.2f}x){extrapolated}",
                        status(ratio >= limit, limit)))
    variant, limit = DEPTH_GROWTH_TARGET
    for length, fig in depth_growth(res, variant):
        lo = min(fig.measured)
        growth = fig.bytes / fig.measured[lo] - 1
        source = f", {fig.source}" if fig.extrapolated else ""
        name = (f"{MEMORY_LABELS[variant]}: activation memory grows <= {limit:.0%} from {lo} to {fig.layers} layers "
                f"({length} tokens, d={fig.spec['hidden_size']})")
        figure = f"{fig.measured[lo] / MiB:.0f} -> {fig.bytes / MiB:.0f} MiB ({growth:+.1%}{source}); {fig.measure}"
        out.append((name, figure, status(growth <= limit, limit)))
    return out


# ------------------------------------------------------------------------------------------------------ report


def baseline(table: dict[str, Any]) -> str:
    """The variant ratios are taken against: Llama + checkpointing + chunked loss where it ran, else + checkpointing."""
    return FAIR if table.get(FAIR) else "llama_ckpt"


def tokens(length: int) -> str:
    """A length as a column head: 4K, or 256."""
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def markdown(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    records = res.get("memory", [])
    table, longest = memory_tables(records)
    if not table:
        return []
    first = next(iter(next(iter(table.values())).values()))
    s, layers = first.spec, first.layers
    lengths = sorted({t for rows in table.values() for t in rows})
    base_name = baseline(table)
    base = table.get(base_name, {})
    kv = s.get("num_kv_heads") or s["num_heads"]  # older records: no key/value head count (as many as heads)
    heads = f"{s['num_heads']} heads" + (f" / {kv} key-value heads" if kv != s["num_heads"] else "")
    sources = sorted({f.source for rows in table.values() for f in rows.values() if f.extrapolated})
    note = f"; {', '.join(sources)}" if sources else ""
    ratio = f", and its ratio to {MEMORY_LABELS[base_name]}" if base else ""
    extrapolated = (f" Rows marked extrapolated: linear in depth to {layers} layers (see the depth fit below); their "
                    "ratios are of extrapolated figures.") if sources else ""
    lines = [(f"## What a user compares: memory of one forward+backward (d={s['hidden_size']}, {layers} "
              f"layers{note}, {heads}, vocabulary {s['vocab_size']}, batch {s['batch_size']}, "
              f"{s.get('dtype', 'fp32')})"), "",
             ("Activation memory of one forward+backward from zeroed gradients (no optimizer state), measured as: "
              f"{measures_used(table)}; MiB{ratio}. `-`: not run (too slow here).{extrapolated}"),
             "", "| model | " + " | ".join(tokens(t) for t in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for variant in MEMORY_VARIANTS:
        rows = table.get(variant)
        if rows:
            cells = [(f"{rows[t].bytes / MiB:.0f}" + (f" ({rows[t].bytes / base[t].bytes:.2f}x)" if t in base else ""))
                     if t in rows else "-" for t in lengths]
            marks = sorted({f.source for f in rows.values() if f.extrapolated})
            label = MEMORY_LABELS[variant] + (f" ({', '.join(marks)})" if marks else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    fits = [(v, t, f) for v in MEMORY_VARIANTS for t, f in sorted(table.get(v, {}).items()) if f.slope is not None]
    if fits:
        lines += ["", (f"Depth fit: activation memory = intercept + slope x layers, through the depths measured, at "
                       f"{layers} layers (MiB):"), "",
                  "| model | tokens | measured (layers: MiB) | slope per layer | intercept | at full depth |",
                  "|---|---|---|---|---|---|"]
        for v, t, f in fits:
            measured = ", ".join(f"{d}: {b / MiB:.0f}" for d, b in sorted(f.measured.items()))
            at = f"{f.bytes / MiB:.0f} ({f.source or 'measured'})"
            lines.append(f"| {MEMORY_LABELS[v]} | {t} | {measured} | {f.slope / MiB:.1f} | {f.intercept / MiB:.0f} | "
                         f"{at} |")
    offload = offload_rows(table)
    if offload:
        lines += ["", (f"Computed, not measured: {MEMORY_LABELS[OFFLOAD]} (transformers' "
                       "`activation_checkpointing_enable(offload=True)`: every checkpointed layer's input held in "
                       "pinned host memory), beside the measured fair baseline. It moves what checkpointing keeps, "
                       "layers x batch x tokens x hidden elements, off the device, copied out in forward and back in "
                       f"backward on the compute stream; copy time at {OFFLOAD_LINK} (an assumption). bf16: a model held "
                       "in bf16 (under bf16 autocast the layer inputs, the residual stream, stay fp32). On CPU the host "
                       "copy is the same memory, so it does not run here."), "",
                  (f"| tokens | {MEMORY_LABELS[FAIR]} (measured, MiB) | moved off the device, fp32 (MiB) | bf16 (MiB) "
                   "| copy time per step, fp32 (ms) | bf16 (ms) |"), "|---|---|---|---|---|---|"]
        for r in offload:
            lines.append(f"| {r['seq_len']} | {r['baseline_bytes'] / MiB:.0f}"
                         + (f" ({r['baseline_source']})" if r["baseline_source"] else "")
                         + f" | {r['fp32']['bytes'] / MiB:.0f} | {r['bf16']['bytes'] / MiB:.0f} | "
                           f"{r['fp32']['copy_s'] * 1e3:.1f} | {r['bf16']['copy_s'] * 1e3:.1f} |")
    computed = longest_table(table, None)
    if computed:
        base_c = computed.get(baseline(computed), {}).get("longest")
        lines += ["", (f"Longest sequence whose forward+backward fits {LONGEST_BUDGET_GIB} GiB with its parameters and "
                       "their gradients, computed, not run: activation memory is linear in length here (no kernel "
                       "holds a tokens x tokens matrix), so the line through the two longest lengths measured gives "
                       "it:"), "",
                  f"| model | bytes per token | fixed (MiB) | longest | vs {MEMORY_LABELS[baseline(computed)]} |",
                  "|---|---|---|---|---|"]
        for variant in (v for v in MEMORY_VARIANTS if v in computed):
            c = computed[variant]
            rel = f"{c['longest'] / base_c:.2f}x" if base_c else "-"
            lines.append(f"| {MEMORY_LABELS[variant]}{' (' + c['source'] + ')' if c['extrapolated'] else ''} | "
                         f"{c['bytes_per_token']:.0f} | {c['fixed_bytes'] / MiB:.0f} | {c['longest']} | {rel} |")
    if longest:
        budget = next(iter(longest.values())).get("budget_bytes")
        longest_base = baseline(longest)
        ck = longest.get(longest_base, {}).get("longest")
        within = f"fits {budget / 2**30:g} GiB" if budget else "runs without running out of memory"
        lines += ["", f"Longest sequence whose forward+backward {within} (doubling, then bisection; full depth):", "",
                  f"| model | longest | vs {MEMORY_LABELS[longest_base]} |", "|---|---|---|"]
        for variant, r in longest.items():
            cap = " (search cap)" if r.get("capped") else ""
            rel = f"{r['longest'] / ck:.2f}x" if ck else "-"
            lines.append(f"| {MEMORY_LABELS[variant]} | {r['longest']}{cap} | {rel} |")
    return lines + [""]


def plot(out: Path, res: dict[str, list[dict[str, Any]]]) -> None:
    table, longest = memory_tables(res.get("memory", []))
    if not table:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for i, (variant, rows) in enumerate((v, table[v]) for v in MEMORY_VARIANTS if v in table):
        xs = sorted(rows)
        marks = sorted({f.source for f in rows.values() if f.extrapolated})
        axes[0].plot(xs, [rows[x].bytes / MiB for x in xs], marker="os^v<>D*"[i % 8], color=f"C{i}",
                     linestyle="-" if variant.startswith("revformer") else "--",
                     label=MEMORY_LABELS[variant] + (f" ({', '.join(marks)})" if marks else ""))
    budget = next((r.get("budget_bytes") for r in longest.values() if r.get("budget_bytes")), None)
    if budget:
        axes[0].axhline(budget / MiB, color="grey", ls=":", label="budget of the right panel")
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="MiB",
                title=f"activation memory of one forward+backward\n({measures_used(table)})")
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
