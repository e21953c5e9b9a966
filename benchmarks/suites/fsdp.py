"""Per-rank memory of FSDP2 training with 1 and 2 ranks, for a model whose parameters dominate memory.

    python -m benchmarks fsdp                 # CPU: ranks over gloo; writes benchmarks/results/fsdp_<device>.*
    python -m benchmarks fsdp --device cuda   # one GPU per rank
    python -m benchmarks fsdp --tiny --results DIR   # a tiny model: the test's run

Each configuration runs in fresh processes (torchrun). Every rank builds the model, shards each sublayer with
`fully_shard` (the units accelerate's FSDP plugin uses with configs/accelerate/fsdp.yaml), runs forward, reversible
backward and an AdamW step, and reports its own peak memory: on CPU the tensor bytes it holds (parameters, gradients
and optimizer state shards, counted exactly) and its peak RSS (with glibc returning freed memory at once); on CUDA
`torch.cuda.max_memory_allocated`. It also counts the all-gathers and reduce-scatters of one step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .. import REPO, RESULTS
from ..env import cpu_name
from ..report import write_jsonl
from ..runner import MALLOC_ENV
from . import command

NAME = "fsdp"

MODEL_ARGS = ("device", "layers", "width", "vocab", "seq", "batch")
TINY = {"layers": 2, "width": 64, "vocab": 256, "seq": 16, "batch": 1}  # --tiny: one 64-wide head per layer


def worker(payload: dict[str, Any]) -> None:
    """Worker mode `fsdp`: one rank (launched by torchrun) trains two steps and writes its figures to
    `payload["out"]/rank<r>_world<w>.json`."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from revformer import RevformerConfig, RevformerForCausalLM

    args = SimpleNamespace(**payload)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    torch.manual_seed(0)
    config = RevformerConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.width * 8 // 3 // 64 * 64,
                             num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                             max_position_embeddings=args.seq, reversible=True)
    model = RevformerForCausalLM(config).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh(device.type, (world,))
    if world > 1:
        for block in model.model.layers:
            fully_shard(block.attention, mesh=mesh)
            fully_shard(block.feed_forward, mesh=mesh)
        fully_shard(model, mesh=mesh)

    counts = {"all_gather": 0, "reduce_scatter": 0}
    for name, key in (("all_gather_single", "all_gather"), ("reduce_scatter_single", "reduce_scatter")):
        original = getattr(dist, name)

        def counted(*a, __original=original, __key=key, **k):
            counts[__key] += 1
            return __original(*a, **k)

        setattr(dist, name, counted)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    for step in range(2):  # the second step has optimizer state: the steady state
        if step == 1:
            counts.update(all_gather=0, reduce_scatter=0)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: they are part of steady-state memory

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    state_bytes = sum(local_bytes(p) + (local_bytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    state_bytes += sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "world_size": world, "rank": rank, "device": str(device), "params": num_params,
        "param_grad_optimizer_bytes_per_rank": state_bytes, "peak_bytes": peak,
        "peak_kind": "max_memory_allocated" if device.type == "cuda" else "peak_rss",
        "collectives_per_step": counts, "loss": loss.item(),
    }
    Path(args.out, f"rank{rank}_world{world}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--tiny", action="store_true", help=f"model sizes {TINY} (the test's run)")


def run(args: argparse.Namespace) -> None:
    if args.tiny:
        vars(args).update(TINY)

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for world in args.ranks:
            env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
            payload = {"mode": "fsdp", "out": out, **{k: getattr(args, k) for k in MODEL_ARGS}}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--master_port", str(29400 + world), "-m", "benchmarks.worker", json.dumps(payload)]
            subprocess.run(cmd, check=True, env=env, cwd=REPO)
            rows += [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"rank*_world{world}.json"))]

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({cpu_name()}, {os.cpu_count()} cores)"
    meta = {"device": device_name, "torch": torch.__version__, "python": platform.python_version(),
            "model": {k: getattr(args, k) for k in ("layers", "width", "vocab", "seq", "batch")}}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"fsdp_{args.device}"
    write_jsonl(stem.with_suffix(".jsonl"), ({**meta, **r} for r in rows))
    lines = [
        f"FSDP2 per-rank memory, {device_name}, torch {torch.__version__}; reversible model "
        f"{args.layers} x {args.width}, vocab {args.vocab} ({rows[0]['params'] / 1e6:.1f}M parameters), "
        f"batch {args.batch} x {args.seq} tokens, AdamW. Command: "
        f"`{command(NAME, *(['--device', 'cuda'] if args.device == 'cuda' else []))}`",
        "",
        "| ranks | rank | params + grads + Adam state held (MiB) | peak memory (MiB) | all-gathers / reduce-scatters per step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["collectives_per_step"]
        lines.append(f"| {r['world_size']} | {r['rank']} | {r['param_grad_optimizer_bytes_per_rank'] / 2**20:.1f} | "
                     f"{r['peak_bytes'] / 2**20:.1f} ({r['peak_kind']}) | {c['all_gather']} / {c['reduce_scatter']} |")
    table = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(table)
    print(table)
