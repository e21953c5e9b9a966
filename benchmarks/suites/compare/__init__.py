"""Memory, speed, longest sequence and quality of revformer against standard baselines.

Models compared at the same width, depth, heads, vocabulary and sequence length (``benchmarks.models``):
``revformer`` (reversible engine), ``revformer_plain`` (``reversible=False``), ``llama`` / ``llama_ckpt``
(Hugging Face LlamaForCausalLM, sdpa, without / with activation checkpointing), ``llama_ckpt_chunked`` (with
checkpointing and a loss over 1024-token chunks recomputed in backward: what TRL or a fused/chunked linear
cross-entropy gives users) and ``reformer`` (Hugging Face ReformerModelWithLMHead, local attention, causal).
``--shape NAME`` sets every part's model shape to a Hub model's (``benchmarks.models.SHAPES``: smollm2-135m,
llama-3.2-1b).

Parts (``--suite``, comma-separated, or ``all``; one module each in this package):

- ``depth``: peak memory and step time of one training step (forward, backward, AdamW) against depth;
- ``core``: reversible / plain step-time ratio at 12 layers and activation memory at 2/12/24 layers;
- ``length``: longest trainable sequence per model (doubling, then bisection) under a memory budget (CPU) or
  until real out-of-memory (CUDA); every probe is also a point of memory against length;
- ``longseq``: revformer's peak memory against length for full / local / lsh attention, with and without chunking;
- ``quality``: validation bits per byte of revformer (reversible and plain) and a Llama of equal parameter count,
  trained on the same bytes for the same tokens;
- ``memory``: activation memory of one forward+backward of revformer's memory options and the baselines against
  length (``memory.depths``: measured at two depths, extrapolated linearly to the shape's), and the longest sequence
  at a budget;
- ``cost``: step time of revformer's default memory options against none and each alone (``cost.variants``: any
  MEMORY_VARIANTS, e.g. revformer against Llama + checkpointing + chunked loss).

Every measurement runs in a fresh process (``python -m benchmarks.worker '<json>'``) so no run's memory leaks into
the next. Memory on CUDA is ``torch.cuda.max_memory_allocated``; on CPU both MemTracker's peak tensor memory and the
process's peak RSS (glibc told to return freed memory at once, so RSS follows live tensors) are reported. Timing runs
are separate processes with the normal allocator, and time the models of one configuration round-robin in the same
process, so their ratios share the machine's noise. Results: ``benchmarks/results/<device>/`` (JSON lines, PNG plots,
README.md with tables and targets); ``python -m benchmarks compare report`` re-renders them from the JSON lines.

    python -m benchmarks compare --suite all                           # CPU sizes, ~25 minutes on 2 cores
    python -m benchmarks compare --suite all --device cuda --dtype bf16
    python -m benchmarks compare --suite memory,cost --set memory.lengths=[4096]
    python -m benchmarks compare --suite memory --shape smollm2-135m --set memory.lengths=[4096] \
        --set 'memory.variants=["revformer","llama_ckpt","llama_ckpt_chunked"]' --set memory.longest=[] --out DIR
    python -m benchmarks compare --suite memory --shape llama-3.2-1b --models revformer,llama_ckpt_chunked \
        --set memory.depths=[2,4] --set memory.lengths=[4096] --set memory.longest=[] --out DIR
    python -m benchmarks compare --suite cost --shape smollm2-135m --set cost.steps=3 \
        --set 'cost.variants=["revformer","llama_ckpt_chunked"]' --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from ... import RESULTS
from ...corpus import DATA_SOURCES
from ...env import device_tag
from ...models import DEFAULT_MODELS, MODELS, SHAPES
from ...report import append_jsonl, read_records
from ...runner import Runner
from .. import command
from . import core, cost, depth, length, longseq, memory, quality

NAME = "compare"
PARTS = ("depth", "core", "length", "longseq", "quality", "memory", "cost")  # run order of `--suite all`
MODULES: dict[str, ModuleType] = {"depth": depth, "core": core, "length": length, "longseq": longseq,
                                  "quality": quality, "memory": memory, "cost": cost}
SECTIONS = ("depth", "core", "length", "longseq", "memory", "cost", "quality")  # order in README.md


def defaults(device: str) -> dict[str, dict[str, Any]]:
    """Default sizes of every part on one device type (CPU sizes fit a ~25 minute run on 2 cores)."""
    cuda = device.startswith("cuda")
    return {s: dict(MODULES[s].CUDA if cuda else MODULES[s].CPU) for s in PARTS}


# ------------------------------------------------------------------------------------------------------ report


def evaluate_targets(res: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """(target, figure, met/missed) for every target that has data."""
    return [t for s in SECTIONS if hasattr(MODULES[s], "targets") for t in MODULES[s].targets(res)]


def render_markdown(out: Path, res: dict[str, list[dict[str, Any]]]) -> str:
    """README.md of a results folder: machine, provenance, targets, then every part's tables."""
    from ...runner import describe

    env = next((r for rs in res.values() for r in rs if "torch" in r), {})
    lines = [f"# revformer benchmarks: {out.name}", "",
             (f"Device `{env.get('gpu') or env.get('cpu', '?')}` ({env.get('cpu_count')} cores, torch threads "
              f"{env.get('threads')}), torch {env.get('torch')}, transformers {env.get('transformers')}. "
              "One training step = forward, backward, fused AdamW step, batch 1, fp32 unless stated. Every memory "
              "figure comes from a fresh process. On CPU a forward+backward (the memory suite) is measured from "
              "torch.profiler's allocation events (its activation peak leaves out parameters and gradients) and a "
              "training step by MemTracker's peak tensor memory (peak RSS for HF Reformer, where MemTracker does not "
              "work: approximate); `max_memory_allocated` on CUDA; activation = peak - (parameters + gradients + "
              "optimizer state) where no profiler figure exists. Step times: median after one warm-up step; the "
              "models of one table are timed round-robin in one process, so compare ratios within a table. "
              f"Raw data: `*.jsonl`; re-render with `{command(NAME, 'report')}`."), ""]
    runs = [r for rs in res.values() for r in rs if r.get("mode") == "suite"]
    if runs:
        walls = ", ".join(f"{r['suite']} {r['wall_s']} s" for r in runs)
        commands = sorted({command(NAME, *r["argv"]) for r in runs})
        total = sum(r["wall_s"] for r in runs)
        lines += [f"Produced by `{'`, `'.join(commands)}`; wall time per suite: {walls} (total {total} s).", ""]
    targets = evaluate_targets(res)
    if targets:
        lines += ["## Targets", "", "| target | figure | status |", "|---|---|---|"]
        lines += [f"| {t} | {f} | **{s}** |" for t, f, s in targets] + [""]
    for suite in SECTIONS:
        lines += MODULES[suite].markdown(res)
    failed = [r for rs in res.values() for r in rs if r.get("mode") != "longest" and not r.get("ok")
              and not r.get("over_budget")]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {describe(r)}" for r in failed] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in sorted(out.glob("*.png"))] + [""]
    return "\n".join(lines)


def render_plots(out: Path, res: dict[str, list[dict[str, Any]]]) -> None:
    """Every part's PNG plots into `out`."""
    for suite in SECTIONS:
        if hasattr(MODULES[suite], "plot"):
            MODULES[suite].plot(out, res)


def report(out: Path) -> str:
    """Re-render the plots and README.md of a results folder from its JSON lines."""
    res = {suite: read_records(out / f"{suite}.jsonl") for suite in PARTS}
    render_plots(out, res)
    text = render_markdown(out, res)
    (out / "README.md").write_text(text)
    return text


# --------------------------------------------------------------------------------------------------------- CLI


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", nargs="?", default="run", choices=("run", "report"),
                   help="run parts (default) or re-render plots and Markdown from existing JSON lines")
    p.add_argument("--suite", default="all", help=f"comma-separated subset of {','.join(PARTS)}, or all")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast (fp32 master weights)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads in every worker (1: robust when other jobs share the cores)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated models for depth/length parts, of {', '.join(MODELS)}")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="every part's model shape (width, depth, heads, key/value heads, vocabulary...) set to a Hub "
                        "model's (benchmarks.models.SHAPES); --set overrides it")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="length part budget (CPU default 0.125)")
    p.add_argument("--data", default="auto", choices=DATA_SOURCES, help="quality part data (revformer.data)")
    p.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds before a worker is abandoned")
    p.add_argument("--skip-time", action="store_true", help="depth part: memory only")
    p.add_argument("--no-report", action="store_true", help="write JSON lines only (no plots/Markdown)")
    p.add_argument("--set", action="append", default=[], metavar="SUITE.KEY=VALUE",
                   help="override a part's size, e.g. depth.depths=[2,8] or length.max_len=8192 (JSON values)")


def run(args: argparse.Namespace) -> None:
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    out = args.out or RESULTS / device_tag(args.device)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "report":
        print(report(out))
        return
    suites = list(PARTS) if args.suite == "all" else args.suite.split(",")
    unknown = [s for s in suites if s not in MODULES]
    if unknown:
        raise SystemExit(f"unknown suite {unknown[0]!r}; choose from {PARTS}")
    sizes = defaults(args.device)
    for part in sizes.values():
        part.update(SHAPES.get(args.shape, {}))
    for item in args.set:
        key, value = item.split("=", 1)
        suite, name = key.split(".", 1)
        sizes[suite][name] = json.loads(value)
    runner = Runner(out, args.worker_timeout)
    start = time.perf_counter()
    for suite in suites:
        path = out / f"{suite}.jsonl"
        path.unlink(missing_ok=True)
        t = time.perf_counter()
        MODULES[suite].run(runner, args, sizes[suite])
        wall = time.perf_counter() - t
        append_jsonl(path, [{"mode": "suite", "suite": suite, "wall_s": round(wall), "argv": args.argv,  # provenance
                             "sizes": sizes[suite], "device": args.device, "ok": True}])
        print(f"== suite {suite} done in {wall:.0f} s", file=sys.stderr, flush=True)
    print(f"== all done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not args.no_report:
        print(report(out))
