"""Per-rank activation memory of one forward+backward under sequence parallelism, for P = 1, 2, 4 processes.

    python -m benchmarks.sequence_parallel [--tokens 16384] [--short 8192] [--procs 1 2 4] [--budget-gib 4]

Spawns P processes over gloo (CPU) or NCCL (`--device cuda`, one GPU per process) for each P; each runs one
forward+backward of the whole sequence's slice (tokens / P) of the same model, and measures its activation peak:
torch.profiler's allocation events on CPU (gradients excluded, `benchmarks.breakdown.activation_timeline`),
`max_memory_allocated` minus what was alive before the step on CUDA. Two lengths give each P's per-rank bytes per
token of the whole sequence (the slope) and its intercept, hence the longest sequence within `--budget-gib` per rank.
Prints the figures with the device and versions, and writes them as JSON and markdown under `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import REPO
from .env import environment

# SmolLM2-135M's width, feed-forward, vocabulary and RoPE base, with 8 heads (2 key/value) instead of 9 (3) so that
# the heads split between 2 and 4 ranks (at 4 the key/value heads are replicated to 4), `local` attention so that
# compute stays linear in the length on CPU, and revformer's default chunked feed-forward and loss.
SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 2,
         "vocab_size": 49152, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "rms_norm_eps": 1e-5,
         "attention_layers": "local", "local_chunk_length": 128}
MiB = 2**20


def worker(rank: int, world: int, rendezvous: str, args: dict[str, Any], out: str) -> None:
    import torch
    import torch.distributed as dist

    from revformer import RevformerConfig, RevformerForCausalLM
    from revformer.sequence_parallel import SequenceParallel, build_mesh, set_sequence_parallel

    torch.set_num_threads(args["threads"])
    cuda = args["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    config = RevformerConfig(**SHAPE, num_hidden_layers=args["layers"], max_position_embeddings=args["tokens"])
    model = RevformerForCausalLM(config).to(device).train()
    sp = SequenceParallel(build_mesh(world, device.type)["sp"].get_group()) if world > 1 else None
    set_sequence_parallel(model, sp)

    def step(ids: Any) -> float:
        ids = ids if sp is None else sp.local(ids)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss.detach())

    records = []
    for tokens in (args["short"], args["tokens"], args["short"]):  # the first (short) step warms up, not kept
        ids = torch.randint(3, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
        model.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss = step(ids)
            grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
            peak = flat = torch.cuda.max_memory_allocated() - before - grads  # gradients are not activations
        else:
            from .breakdown import activation_timeline

            losses: list[float] = []
            profile = activation_timeline(lambda ids=ids, losses=losses: losses.append(step(ids)),
                                          params=model.parameters(), tokens=tokens // world,
                                          hidden_size=config.hidden_size, top=5)
            loss, peak, flat = losses[0], profile["peak_activation_bytes"], profile["flat_peak_bytes"]
        records.append({"tokens": tokens, "rank": rank, "loss": loss, "activation_peak_bytes": peak,
                        "flat_peak_bytes": flat, "step_s": time.perf_counter() - start})
    Path(f"{out}.{rank}").write_text(json.dumps(records[1:]))
    dist.destroy_process_group()


def measure(procs: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-rank records of one spawn of `procs` processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "records")
        mp.spawn(worker, args=(procs, os.path.join(tmp, "rendezvous"), args, out), nprocs=procs, join=True)
        return [r for rank in range(procs) for r in json.loads(Path(f"{out}.{rank}").read_text())]


def summarize(records: dict[int, list[dict[str, Any]]], long: int, short: int, budget: int) -> list[dict[str, Any]]:
    """Per P: the ranks' peaks at both lengths, the largest one's ratio to P = 1 at the long length, the slope
    between the lengths (per-rank bytes per token of the whole sequence), and the longest sequence whose per-rank
    peak fits `budget`, scaling the long length's peak linearly (P = 1's peak is linear through the origin; what
    does not grow with the length, such as the embedding's dense gradient, makes this conservative for P > 1)."""
    rows = []
    for procs, recs in records.items():
        peaks = {t: sorted(r["activation_peak_bytes"] for r in recs if r["tokens"] == t) for t in (short, long)}
        longs = [r for r in recs if r["tokens"] == long]
        rows.append({"procs": procs, "peak_short_bytes": peaks[short][-1], "peak_long_bytes": peaks[long][-1],
                     "peak_long_min_bytes": peaks[long][0],
                     "slope_bytes_per_token": (peaks[long][-1] - peaks[short][-1]) / (long - short),
                     "longest_tokens_in_budget": int(budget * long / peaks[long][-1]),
                     "loss": sum(r["loss"] for r in longs) / procs, "step_s": max(r["step_s"] for r in longs)})
    base = rows[0]
    for row in rows:
        row["ratio_vs_1"] = row["peak_long_bytes"] / base["peak_long_bytes"]
        row["longest_ratio_vs_1"] = row["longest_tokens_in_budget"] / base["longest_tokens_in_budget"]
    return rows


def markdown(env: dict[str, Any], args: dict[str, Any], rows: list[dict[str, Any]], command: str) -> str:
    short, long, budget = args["short"], args["tokens"], args["budget_gib"]
    lines = [
        "# Sequence parallelism: per-rank activation memory of one forward+backward", "",
        f"`{command}`", "",
        (f"Device {env['device']} ({env.get('gpu') or env['cpu']}), torch {env['torch']}, transformers "
         f"{env['transformers']}, {args['threads']} thread(s) per process. Model: SmolLM2-135M's width (d=576, "
         f"feed-forward 1536, vocabulary 49152) at {args['layers']} layers with 8 heads (2 key/value), `local` "
         "attention (chunks of 128), reversible, fp32, revformer's default feed-forward and loss chunks; batch 1. "
         "Peak: live activation bytes of the step (torch.profiler's allocation events on CPU, gradients excluded), "
         "on the rank that holds the most (and the least, in brackets). The longest sequence within the budget "
         f"scales the {long}-token peak linearly."), "",
        (f"| P | peak at {short} tokens (MiB) | peak at {long} tokens (MiB) | ratio to P=1 | slope, bytes per token "
         f"| longest sequence within {budget:g} GiB per rank | ratio to P=1 | loss (mean over ranks) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['procs']} | {r['peak_short_bytes'] / MiB:.1f} | {r['peak_long_bytes'] / MiB:.1f} "
                     f"({r['peak_long_min_bytes'] / MiB:.1f}) | {r['ratio_vs_1']:.3f} | "
                     f"{r['slope_bytes_per_token']:.0f} | {r['longest_tokens_in_budget']:,} | "
                     f"{r['longest_ratio_vs_1']:.2f} | {r['loss']:.6f} |")
    lines += ["", ("Each rank's loss is P x its share of the sequence's mean, so their mean is the sequence's "
                   "loss: equal to P=1's up to summation order."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="the long sequence (per step, before splitting)")
    parser.add_argument("--short", type=int, default=8192, help="the second length, for the slope")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="per-rank activation budget")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/cpu-sequence-parallel"))
    parser.add_argument("--records", help="summarize the records of an earlier run's memory.json; measure nothing")
    ns = parser.parse_args(argv)
    if ns.records:
        saved = json.loads(Path(ns.records).read_text())
        args, env, command = saved["args"], saved["environment"], saved["command"]
        records = {int(procs): recs for procs, recs in saved["records"].items()}
    else:
        args = {k: v for k, v in vars(ns).items() if k != "records"}
        if 1 not in ns.procs:
            parser.error("--procs must include 1 (the reference)")
        env = environment(ns.device, ns.threads)
        print(f"device {env['device']} ({env.get('gpu') or env['cpu']}), torch {env['torch']}, "
              f"transformers {env['transformers']}", flush=True)
        records = {}
        for procs in sorted(ns.procs):
            records[procs] = measure(procs, args)
            print(f"P={procs}: " + ", ".join(f"rank {r['rank']} {r['tokens']} tokens "
                                             f"{r['activation_peak_bytes'] / MiB:.1f} MiB" for r in records[procs]))
        command = "python -m benchmarks.sequence_parallel " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in args.items() if k != "out")
    rows = summarize(records, args["tokens"], args["short"], int(args["budget_gib"] * 2**30))
    text = markdown(env, args, rows, command)
    if ns.records:
        text += ("\nSummarized from the records that command measured: `python -m benchmarks.sequence_parallel "
                 "--records memory.json`.\n")
    print(text)
    out = Path(ns.out if not ns.records else Path(ns.records).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(text)
    (out / "memory.json").write_text(json.dumps({"command": command, "environment": env, "args": args,
                                                 "summary": rows, "records": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
