"""Which tensors hold the peak activation memory of one forward+backward step, by category, for revformer and the
Llama baseline: bytes per token and hidden unit.

Each model runs in a fresh worker process: a warm-up forward+backward at a short length, gradients set to None, then
one forward+backward at ``--seq-len`` under torch.profiler (``profile_memory``, Python stacks, shapes), whose
allocation events are replayed in time order (``benchmarks.breakdown``). Only what the step allocates counts;
gradients (what is some parameter's ``.grad`` at the end) are left out. At the peak of live activations every live
allocation is labelled by the code that made it (``benchmarks.breakdown.RULES``: streams, stream gradients, the
re-run sublayers, the loss chunk, checkpointed layer inputs, layer recompute, ...); the same at the peak of the flat
part, everything but the loss chunk, which is what grows with the sequence.

Models (``--models``): ``revformer`` (RevformerConfig defaults), ``revformer_bdia`` (the converted-model
configuration: bdia coupling, fixed-point streams) and ``llama_ckpt_chunked`` (Llama + activation checkpointing +
chunked loss), at ``--shape`` (a hub model's sizes, ``benchmarks.models.SHAPES``). Results: ``breakdown.jsonl``
(appended) and ``README.md`` (this run's table) under ``--out``. ``--tiny``: d=64, 2 layers, 256 tokens (the test's
run).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .. import RESULTS
from ..models import SHAPES, spec_from
from ..report import MiB
from ..runner import Runner
from . import command

NAME = "breakdown"
OUT = RESULTS / "breakdown"
MODELS = "revformer,revformer_bdia,llama_ckpt_chunked"
LABELS = {"revformer": "revformer (default config)", "revformer_bdia": "revformer, bdia (fixed-point streams)",
          "llama_ckpt_chunked": "Llama + checkpointing + chunked loss"}
# --tiny: the whole pipeline in seconds; the chunks (64) are shorter than the sequence, so the chunked paths run.
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 0, "intermediate_size": 0,
        "vocab_size": 259, "seq_len": 256, "chunk": 64}
TOTAL, FLAT_AT_PEAK, FLAT = "peak activations", "flat part at this peak", "flat peak (loss chunk excluded)"


def spec_of(args: argparse.Namespace, model: str) -> Any:
    """The Spec of `model` at the run's shape, length, depth, device and threads."""
    if args.tiny:
        sizes = dict(TINY, chunk=TINY["chunk"] if model.startswith("revformer") else None)
    else:
        sizes = {**SHAPES[args.shape], "seq_len": args.seq_len}
    if args.layers:
        sizes["num_layers"] = args.layers
    return spec_from(sizes, model, device=args.device, threads=args.threads)


def launch(runner: Runner, payload: dict[str, Any], **tags: Any) -> dict[str, Any]:
    """Run `payload` (probes.breakdown_main) in a fresh worker; the record lands in `breakdown.jsonl`."""
    return runner.launch(payload, NAME, False, **tags)[0]


def cell(value: int | None, units: int) -> str:
    """'MiB (bytes/token/hidden)'."""
    return "–" if value is None else f"{value / MiB:.1f} ({value / units:.2f})"


def table(records: list[dict[str, Any]], flat: bool) -> list[str]:
    """Markdown: one column per model, one row per category (largest first), at the peak of activations or (`flat`)
    at the peak of the flat part; then the totals and where the peak is."""
    key = "flat_categories" if flat else "categories"
    largest: dict[str, int] = {}
    for r in records:
        for name, value in r.get(key, {}).items():
            largest[name] = max(largest.get(name, 0), value)
    label = [LABELS.get(r["spec"]["model"], r["spec"]["model"]) for r in records]
    lines = ["| MiB (bytes / token / hidden unit) | " + " | ".join(label) + " |", "|---" * (len(records) + 1) + "|"]

    def row(title: str, value: Any) -> str:
        cells = [cell(value(r), r["tokens"] * r["hidden_size"]) if r.get("ok") else "failed" for r in records]
        return f"| {title} | " + " | ".join(cells) + " |"

    lines += [row(name, lambda r, n=name: r[key].get(n)) for name in sorted(largest, key=lambda n: -largest[n])]
    if flat:
        lines.append(row(f"**{FLAT}**", lambda r: r["flat_peak_bytes"]))
    else:
        lines.append(row(f"**{TOTAL}**", lambda r: r["peak_activation_bytes"]))
        lines.append(row(f"**{FLAT_AT_PEAK}**", lambda r: r["flat_at_peak_bytes"]))
        lines.append(row("gradients (not counted above)", lambda r: r["gradient_bytes"]))
    peak = "flat_peak" if flat else "peak"
    lines.append("| where the peak is | " + " | ".join(
        f"{r[peak]['phase']}: {r[peak]['category']}" if r.get("ok") else "failed" for r in records) + " |")
    return lines


def render(records: list[dict[str, Any]], argv: list[str], shape: str) -> str:
    """The README: what was measured, the two tables, the machine and the command."""
    env = next((r for r in records if r.get("torch")), {})
    spec = records[0]["spec"]
    machine = (f"{env.get('gpu') or env.get('cpu')}, {env.get('threads')} thread(s); torch {env.get('torch')}, "
               f"transformers {env.get('transformers')}, python {env.get('python')}")
    lines = [
        "# Peak activation memory of one forward+backward, by what holds it", "",
        (f"{shape}: d={spec['hidden_size']}, {spec['num_layers']} layers, {spec['num_heads']} heads "
         f"({spec['num_kv_heads'] or spec['num_heads']} key/value), vocabulary {spec['vocab_size']}, "
         f"{spec['batch_size']} x {spec['seq_len']} tokens, {spec['dtype']}, device {spec['device']}. Live tensor "
         "bytes from torch.profiler's allocation events: what the step allocates, gradients excluded (parameters "
         "are never counted); in brackets, bytes per token and hidden unit."), "",
        "## At the peak of activations", "",
        *table(records, flat=False), "",
        "## At the peak of the flat part", "",
        ("Everything but the loss chunk, whose size does not grow with the sequence (the loss's tokens x hidden "
         "tensors count as flat): what each token costs. Its peak can fall elsewhere in the step than the peak of "
         "all activations."), "",
        *table(records, flat=True), "",
        f"Machine: {machine}.", "",
        (f"Reproduce: `{command(NAME, *argv)}`. Raw records (the largest live tensors at each peak, with the "
         "function and op that made them): `breakdown.jsonl`."),
    ]
    return "\n".join(lines) + "\n"


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES), help="hub model sizes")
    p.add_argument("--models", default=MODELS, help="comma-separated benchmarks.models names")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--layers", type=int, default=None, help="override the shape's depth")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=30, help="largest live tensors kept per model")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per model")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--tiny", action="store_true", help="d=64, 2 layers, 256 tokens, chunks of 64 (the test's run)")


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.out, args.timeout)
    records = []
    for model in args.models.split(","):
        spec = spec_of(args, model)
        payload = {"mode": "breakdown", "spec": dataclasses.asdict(spec), "top": args.top}
        records.append(launch(runner, payload, shape="tiny" if args.tiny else args.shape))
    text = render(records, args.argv, "tiny" if args.tiny else args.shape)
    (args.out / "README.md").write_text(text)
    print(text)
    return 0 if all(r.get("ok") for r in records) else 1
