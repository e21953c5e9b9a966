"""LSH attention measurements: causality/determinism checks and peak training memory.

``python -m benchmarks lsh leak``: the leak probe (2 `lsh` layers, 8 buckets, 2 hashes, chunk 8,
attention weights scaled up so attention is not uniform): max |change| of logits before a perturbed token (train
mode under one seed, eval mode), eval run-to-run difference, cached decoding vs the full forward, and a left-padded
row vs the same row unpadded, for `full`, `local` and `lsh`.

``python -m benchmarks lsh memory --lengths 8192,16384,32768,65536``: peak memory of one training step
(forward, backward, AdamW) of revformer `local`, revformer `lsh` and HF Reformer `lsh` at equal layers, width,
heads, hashes, buckets and chunk length, each in a fresh process. revformer: MemTracker peak tensor memory and peak
RSS; Reformer: peak RSS only (MemTracker cannot follow its custom autograd Function). glibc is told to return freed
memory at once so that RSS follows live tensors. Results: JSON lines + a Markdown table under
``benchmarks/results/lsh/`` (``--out``). ``--tiny``: memory at 256 tokens, chunk 32 (the test's run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import RESULTS
from ..env import environment
from ..models import Spec, build_model
from ..probes import memtracker, memtracker_peak, proc_status, reset_peak_rss
from ..report import MiB, write_jsonl
from ..runner import MALLOC_ENV, emit, run_worker

NAME = "lsh"
OUT = RESULTS / "lsh"
KINDS = "revformer_local,revformer_lsh,reformer_lsh"


def lsh_environment() -> dict[str, Any]:
    """The machine fields of every LSH record."""
    import torch

    return environment("cpu", torch.get_num_threads(), ("device", "cpu", "torch", "transformers", "threads"))


# ------------------------------------------------------------------------------------------------------ leak


def leak(args: argparse.Namespace) -> None:
    """Logit changes that would reveal a leak from later tokens, per attention kind; written to leak.jsonl."""
    import torch

    from revformer import RevformerConfig, RevformerForCausalLM

    torch.set_num_threads(args.threads)
    kinds = {
        "full": dict(attention_layers="full"),
        "local": dict(attention_layers="local", local_chunk_length=8, local_num_chunks_before=1),
        "lsh": dict(attention_layers="lsh", lsh_num_buckets=8, lsh_num_hashes=2, lsh_chunk_length=8),
    }
    rows = []
    for kind, extra in kinds.items():
        torch.manual_seed(0)
        config = RevformerConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=256, pad_token_id=0, **extra)
        model = RevformerForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(s in name for s in ("q_proj", "k_proj", "v_proj")):
                    p.mul_(8.0)  # far from uniform attention
        ids = torch.randint(3, 128, (1, 64))
        changed = ids.clone()
        changed[0, 40] = (ids[0, 40] + 1) % 125 + 3
        result = {"kind": kind}
        with torch.no_grad():
            for mode in ("train", "eval"):
                model.train(mode == "train")
                torch.manual_seed(1)
                a = model(ids).logits
                torch.manual_seed(1)
                b = model(changed).logits
                result[f"leak_{mode}"] = (a[:, :40] - b[:, :40]).abs().max().item()
            model.eval()
            torch.manual_seed(1)
            first = model(ids).logits
            torch.manual_seed(2)
            result["eval_rerun"] = (model(ids).logits - first).abs().max().item()
            cache, steps = None, []
            for t in range(ids.shape[1]):
                out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
                cache = out.cache
                steps.append(out.logits)
            result["cached_vs_full"] = (torch.cat(steps, dim=1) - first).abs().max().item()
            pad = 13
            padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
            mask = (padded != 0).long()
            mask[0, pad:] = 1
            padded_logits = model(padded, attention_mask=mask).logits[:, pad:]
            result["left_padded_vs_alone"] = (padded_logits - first).abs().max().item()
        rows.append(result)
        print(json.dumps(result), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "leak.jsonl", [{**r, **lsh_environment()} for r in rows])


# ---------------------------------------------------------------------------------------------------- memory


def build(kind: str, seq_len: int, chunk: int, ff_chunk: int) -> Any:
    """d=128, 2 layers, 4 heads, byte vocabulary; revformer `local` / `lsh` or HF Reformer `lsh` (2 hashes,
    ~one bucket per chunk), feed-forward and loss (LM-head) chunks of `ff_chunk` (0 = none)."""
    model, attention = kind.split("_", 1)
    return build_model(Spec(model=model, seq_len=seq_len, attention=attention, attn_chunk=chunk, chunk=ff_chunk,
                            ff_chunk=ff_chunk, loss_chunk=ff_chunk))


def memory_worker(payload: dict[str, Any]) -> None:
    """Worker mode `lsh_memory`: peak memory of one training step (AdamW, not fused) after a warm-up step that
    creates the optimizer state; static = parameters + gradients + 2 Adam moments."""
    import torch

    kind, seq_len, chunk, ff_chunk = payload["kind"], payload["seq_len"], payload["chunk"], payload["ff_chunk"]
    torch.set_num_threads(1)
    model = build(kind, seq_len, chunk, ff_chunk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False, foreach=False)

    def step(ids: Any) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return float(loss)

    step(torch.randint(0, 259, (1, 2 * chunk * 4)))  # optimizer state exists before the measured step
    ids = torch.randint(0, 259, (1, seq_len))
    static = sum(p.numel() * p.element_size() * 4 for p in model.parameters())  # params + grads + 2 Adam moments
    rss_before = proc_status("VmRSS")
    reset_peak_rss()
    tracker = memtracker(model, optimizer) if kind.startswith("revformer") else None
    start = time.perf_counter()
    if tracker is not None:
        with tracker:
            loss = step(ids)
    else:
        loss = step(ids)
    record = {"kind": kind, "seq_len": seq_len, "chunk": chunk, "ff_and_loss_chunk": ff_chunk, "loss": loss,
              "step_s": time.perf_counter() - start, "static_bytes": static,
              "rss_peak_bytes": proc_status("VmHWM") - rss_before + static, **lsh_environment()}
    if tracker is not None:
        record["memtracker_peak_bytes"] = memtracker_peak(tracker)["Total"]
    emit(record)


def memory(args: argparse.Namespace) -> None:
    """One fresh process per length and kind; memory.jsonl and README.md (the table) in `args.out`."""
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for seq_len in [int(x) for x in args.lengths.split(",")]:
        for kind in args.kinds.split(","):
            payload = {"mode": "lsh_memory", "kind": kind, "seq_len": seq_len, "chunk": args.chunk,
                       "ff_chunk": args.ff_chunk}
            done = run_worker(payload, args.timeout, {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"})
            record = done.records[0] if done.records else {"kind": kind, "seq_len": seq_len,
                                                            "error": done.stderr[-1500:]}
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k not in ("cpu",)}), file=sys.stderr, flush=True)
    write_jsonl(args.out / "memory.jsonl", records)
    print(table(records))
    (args.out / "README.md").write_text(table(records) + "\n")


def table(records: list[dict[str, Any]]) -> str:
    """MemTracker and RSS peaks per model (rows) and length (columns), MiB."""
    lengths = sorted({r["seq_len"] for r in records})
    kinds = list(dict.fromkeys(r["kind"] for r in records))
    env = next((r for r in records if "torch" in r), {})
    lines = [f"Peak memory of one training step (MiB; d=128, 2 layers, 4 heads, chunk length "
             f"{records[0].get('chunk')}, 2 hashes, seq_len/chunk/2 buckets; feed-forward/loss chunk "
             f"{records[0].get('ff_and_loss_chunk')}). {env.get('cpu')}, torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}, 1 thread. MemTracker = peak tensor memory; RSS = peak resident set.", "",
             "| model | measure | " + " | ".join(f"{t // 1024}K" for t in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for kind in kinds:
        for key, label in (("memtracker_peak_bytes", "MemTracker"), ("rss_peak_bytes", "RSS")):
            cells = []
            for t in lengths:
                r = next((r for r in records if r["kind"] == kind and r["seq_len"] == t), {})
                cells.append(f"{r[key] / MiB:.0f}" if key in r else ("failed" if "error" in r else "–"))
            if any(c != "–" for c in cells):
                lines.append(f"| {kind} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", choices=("leak", "memory"))
    p.add_argument("--lengths", default="8192,16384,32768,65536")
    p.add_argument("--kinds", default=KINDS)
    p.add_argument("--chunk", type=int, default=128, help="local / lsh chunk length")
    p.add_argument("--ff-chunk", type=int, default=0, help="feed-forward and loss chunk (0 = none)")
    p.add_argument("--threads", type=int, default=2, help="leak: torch threads")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path, default=OUT, help="results folder (default benchmarks/results/lsh)")
    p.add_argument("--tiny", action="store_true", help="memory at 256 tokens, chunk 32 (the test's run)")


def run(args: argparse.Namespace) -> None:
    if args.tiny:
        args.lengths, args.chunk = "256", 32
    leak(args) if args.command == "leak" else memory(args)
