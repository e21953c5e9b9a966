"""Fixed-point vs float residual streams under bf16 compute: reconstruction error, gradient error, step time.

For depths 6..96 (bf16 autocast, block weights scaled x3 as training grows them) it measures, for bf16, fp32 and
fixed-point streams:
  * reconstruction error: max |x - x'| after rebuilding the first layer's input from the top streams;
  * gradient error: max over parameters of max|g - g_ref| / max|g_ref|, against the same model run in fp64 with plain
    backprop, for the reversible path and for plain backprop on the same streams (the floor bf16 compute sets).
Then the fixed-point error against `stream_fraction_bits` at one depth, and the training-step time of fixed-point vs
fp32 streams (reversible path, bf16 autocast, AdamW; steps interleaved so load drift hits both; median after warm-up),
with 2 threads (wall time) and 1 thread (wall and process CPU time, which other processes on the machine barely skew).

    python -m benchmarks fixed_point            # full run, a few minutes on 2 CPU cores
    python -m benchmarks fixed_point --quick    # smoke test
    python -m benchmarks fixed_point --tiny --out DIR   # seconds: the test's run

Writes benchmarks/results/fixed_point_cpu.jsonl (one JSON object per line), .png and .md (`_quick` / `_tiny` with
those flags).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from revformer import RevformerConfig, RevformerForCausalLM
from revformer.reversible import StreamArithmetic, stream_arithmetic

from .. import RESULTS
from ..env import cpu_name
from ..models import autocast as bf16_autocast
from ..probes import max_relative_error
from ..report import pyplot, save_figure, write_jsonl

NAME = "fixed_point"


class Float64Arithmetic(StreamArithmetic):
    """float64 streams, for the fp64 reference."""

    def encode(self, x: Tensor) -> Tensor:
        return x.double()


class BFloat16Arithmetic(StreamArithmetic):
    """bf16 streams: what a model cast wholesale to bf16 would keep."""

    def encode(self, x: Tensor) -> Tensor:
        return x.bfloat16()


def arithmetic(streams: str, fraction_bits: int = 32) -> StreamArithmetic:
    """The stream arithmetic named `streams`: bfloat16, float32 or fixed_point (with `fraction_bits`)."""
    return BFloat16Arithmetic() if streams == "bfloat16" else stream_arithmetic(streams, fraction_bits)


def build(depth: int, weight_scale: float, dtype: torch.dtype = torch.float32, streams: StreamArithmetic | None = None,
          **sizes) -> RevformerForCausalLM:
    """The measured model with `streams` (default: the config's float32 streams); the same weights for every
    `streams`, since each build starts from the same seed."""
    torch.manual_seed(0)
    config = RevformerConfig(vocab_size=128, num_hidden_layers=depth, max_position_embeddings=1024, **sizes)
    model = RevformerForCausalLM(config, streams=streams).to(dtype).train()
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:  # linear weights; norms stay at 1
                p.mul_(weight_scale)
    return model


def gradients(model: RevformerForCausalLM, ids: Tensor, reversible: bool, autocast: bool) -> dict[str, Tensor]:
    model.config.reversible = reversible
    model.zero_grad(set_to_none=True)
    with bf16_autocast(ids.device.type, "bf16" if autocast else "fp32"):
        model(ids, labels=ids).loss.backward()
    return {name: p.grad.double() for name, p in model.named_parameters()}


def gradient_error_l2(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """|g - g_ref| / |g_ref| over all parameters as one vector."""
    diff = sum(((grads[n] - ref) ** 2).sum() for n, ref in reference.items())
    return (diff / sum((ref**2).sum() for ref in reference.values())).sqrt().item()


def accuracy(depths: list[int], fraction_bits: list[int], sweep_depth: int, args: argparse.Namespace) -> list[dict]:
    sizes = dict(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_attention_heads=4)
    ids = torch.randint(0, 128, (2, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for depth in depths:
        reference_model = build(depth, args.weight_scale, torch.float64, Float64Arithmetic(), **sizes)
        reference = gradients(reference_model, ids, reversible=False, autocast=False)
        variants = [(s, 32) for s in ("bfloat16", "float32", "fixed_point")]
        if depth == sweep_depth:
            variants += [("fixed_point", k) for k in fraction_bits if k != 32]
        for streams, k in variants:
            model = build(depth, args.weight_scale, streams=arithmetic(streams, k), **sizes)
            row = dict(
                kind="accuracy", depth=depth, streams=streams, fraction_bits=k if streams == "fixed_point" else None
            )
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    row["reconstruction_error"] = model.model.reconstruction_error(ids)
                reversible = gradients(model, ids, reversible=True, autocast=True)
                plain = gradients(model, ids, reversible=False, autocast=True)
            except OverflowError as error:
                row["error"] = str(error).split(":")[0]
            else:
                row["grad_error_reversible"] = max_relative_error(reversible, reference)
                row["grad_error_plain"] = max_relative_error(plain, reference)
                row["grad_error_reversible_vs_plain"] = max_relative_error(reversible, plain)
                row["grad_error_l2_reversible"] = gradient_error_l2(reversible, reference)
                row["grad_error_l2_plain"] = gradient_error_l2(plain, reference)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def step_times(args: argparse.Namespace) -> list[dict]:
    """Per thread count and shape: median forward+backward and full step (with AdamW) times, fp32 vs fixed point.

    Wall time with the requested threads is what training sees, but on a shared machine other processes stall
    multi-threaded ops. The single-thread process CPU time does not count time spent descheduled, so its overhead
    holds up under load.
    """
    rows = []
    for threads in args.timing_threads:
        torch.set_num_threads(threads)
        for hidden, depth, seq, batch in args.timing_shapes:
            sizes = dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_attention_heads=hidden // 64)
            # One model per stream arithmetic, the same weights; tiny optimizer steps keep them as built.
            models = {name: build(depth, 1.0, streams=stream_arithmetic(name), **sizes)
                      for name in ("float32", "fixed_point")}
            optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-6) for name, m in models.items()}
            ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))
            times: dict[str, dict[str, list[float]]] = {n: {"fwd_bwd": [], "step": [], "cpu": []} for n in models}
            for step in range(args.warmup + args.steps):
                for name, model in models.items():  # interleaved, so load from other processes hits both alike
                    optimizer = optimizers[name]
                    start, cpu_start = time.perf_counter(), time.process_time()
                    gradients(model, ids, reversible=True, autocast=True)
                    middle = time.perf_counter()
                    optimizer.step()
                    if step >= args.warmup:
                        times[name]["fwd_bwd"].append(middle - start)
                        times[name]["step"].append(time.perf_counter() - start)
                        times[name]["cpu"].append(time.process_time() - cpu_start)

            def overhead(kind: str) -> float:
                pairs = zip(times["float32"][kind], times["fixed_point"][kind])
                return statistics.median(fixed / base for base, fixed in pairs) - 1.0

            row = dict(
                kind="step_time", threads=threads, hidden_size=hidden, depth=depth, seq=seq, batch=batch,
                steps=args.steps,
                **{f"{name}_{kind}_s": statistics.median(t) for name in models for kind, t in times[name].items()},
                overhead_fwd_bwd=overhead("fwd_bwd"), overhead_step=overhead("step"), overhead_step_cpu=overhead("cpu"),
            )  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    torch.set_num_threads(args.threads)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else ("0 (exact)" if value == 0 else f"{value:.2e}")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    acc = {(r["depth"], r["streams"], r["fraction_bits"]): r for r in rows if r["kind"] == "accuracy"}
    depths = sorted({d for d, _, _ in acc})
    lines = [
        f"# Fixed-point residual streams ({meta['device']}, torch {meta['torch']}, {meta['threads']} threads)",
        "",
        (
            f"bf16 autocast, hidden {meta['hidden']}, seq {meta['seq']}, block weights x{meta['weight_scale']}. "
            "Gradient error: max over parameters of max|g - g_ref| / max|g_ref| against fp64 plain backprop."
        ),
        "",
        (
            "| layers | recon. err bf16 | recon. err fp32 | recon. err fixed | grad err rev bf16 | grad err rev fp32 "
            "| grad err rev fixed | grad err plain fp32 | grad err plain fixed |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in depths:
        b, f, x = acc[(d, "bfloat16", None)], acc[(d, "float32", None)], acc[(d, "fixed_point", 32)]
        lines.append(
            f"| {d} | {fmt(b.get('reconstruction_error'))} | {fmt(f.get('reconstruction_error'))} "
            f"| {fmt(x.get('reconstruction_error'))} | {pct(b.get('grad_error_reversible'))} "
            f"| {pct(f.get('grad_error_reversible'))} | {pct(x.get('grad_error_reversible'))} "
            f"| {pct(f.get('grad_error_plain'))} | {pct(x.get('grad_error_plain'))} |"
        )
    sweep = sorted((k, r) for (d, s, k), r in acc.items() if s == "fixed_point" and d == meta["sweep_depth"])
    lines += ["", f"Fixed point at {meta['sweep_depth']} layers vs `stream_fraction_bits` k (limit 2^(53-k)):", "",
              "| k | limit | recon. err | grad err rev | grad err rev vs plain |", "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for k, r in sweep:
        if "error" in r:
            lines.append(f"| {k} | {2.0 ** (53 - k):.3g} | {r['error']} | | |")
        else:
            lines.append(
                f"| {k} | {2.0 ** (53 - k):.3g} | {fmt(r['reconstruction_error'])} | {pct(r['grad_error_reversible'])} "
                f"| {fmt(r['grad_error_reversible_vs_plain'])} |"
            )
    loaded = max(meta["load_average"], meta["load_average_end"]) > 1.5
    lines += [
        "",
        (
            "Training step, reversible path, bf16 autocast: medians of interleaved steps, overhead = median of "
            "per-step ratios fixed/fp32. fwd+bwd = forward + reversible backward; step = that + AdamW; CPU = process "
            f"CPU time of the step. Load average {meta['load_average']:.1f} at start, {meta['load_average_end']:.1f} "
            "at end" + (" (other processes were running: wall times are inflated and noisy)." if loaded else ".")
        ),
        "",
        (
            "| threads | hidden | layers | batch x seq | step fp32 | step fixed | overhead fwd+bwd | overhead step "
            "| overhead step (CPU) |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["kind"] == "step_time":
            lines.append(
                f"| {r['threads']} | {r['hidden_size']} | {r['depth']} | {r['batch']} x {r['seq']} "
                f"| {1e3 * r['float32_step_s']:.0f} ms | {1e3 * r['fixed_point_step_s']:.0f} ms "
                f"| {100 * r['overhead_fwd_bwd']:+.1f}% | {100 * r['overhead_step']:+.1f}% "
                f"| {100 * r['overhead_step_cpu']:+.1f}% |"
            )
    return "\n".join(lines) + "\n"


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    fig, (ax_rec, ax_grad) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    styles = {"bfloat16": ("bf16 streams", "tab:red"), "float32": ("fp32 streams", "tab:blue"),
              "fixed_point": ("fixed-point streams (k=32)", "tab:green")}  # fmt: skip
    for streams, (label, color) in styles.items():
        sel = sorted(
            (
                r
                for r in rows
                if r["kind"] == "accuracy" and r["streams"] == streams and r["fraction_bits"] in (None, 32)
            ),
            key=lambda r: r["depth"],
        )
        depths = [r["depth"] for r in sel]
        nan = float("nan")  # a run that overflowed leaves a gap
        ax_rec.plot(depths, [r.get("reconstruction_error", nan) for r in sel], "o-", color=color, label=label)
        reversible = [r.get("grad_error_reversible", nan) for r in sel]
        ax_grad.plot(depths, reversible, "o-", color=color, label=f"reversible, {label}")
        if streams == "float32":
            plain = [r.get("grad_error_plain", nan) for r in sel]
            ax_grad.plot(depths, plain, "k--", label="plain backprop, fp32 streams")
    ax_rec.set_yscale("symlog", linthresh=1e-9)  # symlog: fixed point's exact 0 stays on the plot
    ax_rec.set_title("reconstruction error max|x - x'| (0 = bit-exact)")
    ax_grad.set_yscale("log")
    ax_grad.set_title("gradient error vs fp64 plain backprop")
    for ax in (ax_rec, ax_grad):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["depth"] for r in rows if r["kind"] == "accuracy"}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("layers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bf16 compute, weights x{meta['weight_scale']} - {meta['device']}, torch {meta['torch']}", fontsize=9)
    save_figure(fig, path, dpi=120)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48, 96])
    parser.add_argument("--fraction-bits", type=int, nargs="+", default=[12, 16, 20, 24, 32, 40, 48])
    parser.add_argument("--sweep-depth", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--weight-scale", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--quick", action="store_true", help="two depths, one small timing shape")
    parser.add_argument("--tiny", action="store_true", help="two shallow depths, one tiny timing shape, one thread")
    parser.add_argument("--out", type=Path, default=RESULTS)


def run(args: argparse.Namespace) -> None:
    # (hidden, layers, seq, batch): three widths, since the fixed-point work is per stream element while the
    # matmul work per element grows with width.
    args.timing_shapes = [(256, 8, 256, 4), (512, 4, 512, 2), (1024, 2, 512, 2)]
    if args.quick:
        args.depths, args.sweep_depth, args.fraction_bits = [6, 12], 12, [24, 32]
        args.timing_shapes, args.warmup, args.steps = [(128, 4, 128, 2)], 1, 3
    if args.tiny:
        args.depths, args.sweep_depth, args.fraction_bits, args.hidden, args.seq = [2, 4], 4, [16, 32], 32, 16
        args.timing_shapes, args.timing_threads, args.warmup, args.steps = [(64, 2, 32, 1)], [1], 1, 2

    torch.set_num_threads(args.threads)
    meta = dict(
        kind="meta", device=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(),
        hidden=args.hidden, seq=args.seq, weight_scale=args.weight_scale, sweep_depth=args.sweep_depth,
        load_average=os.getloadavg()[0],  # other processes on the machine inflate and scatter the step times
    )  # fmt: skip
    print(json.dumps(meta), flush=True)
    start = time.perf_counter()
    rows = accuracy(args.depths, args.fraction_bits, args.sweep_depth, args) + step_times(args)
    meta["seconds"] = round(time.perf_counter() - start, 1)
    meta["load_average_end"] = os.getloadavg()[0]

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("fixed_point_cpu" + ("_tiny" if args.tiny else "_quick" if args.quick else ""))
    write_jsonl(stem.with_suffix(".jsonl"), [meta, *rows])
    table = markdown(meta, rows)
    stem.with_suffix(".md").write_text(table)
    plot(meta, rows, stem.with_suffix(".png"))
    print(table)
    print(f"wrote {stem}.{{jsonl,md,png}} in {meta['seconds']} s")
