#!/usr/bin/env python
"""LSH attention measurements: causality/determinism checks and peak training memory.

``python scripts/benchmark_lsh.py leak``: the leak probe (2 `lsh` layers, 8 buckets, 2 hashes, chunk 8,
attention weights scaled up so attention is not uniform): max |change| of logits before a perturbed token (train
mode under one seed, eval mode), eval run-to-run difference, cached decoding vs the full forward, and a left-padded
row vs the same row unpadded, for `full`, `local` and `lsh`.

``python scripts/benchmark_lsh.py memory --lengths 8192,16384,32768,65536``: peak memory of one training step
(forward, backward, AdamW) of revformer `local`, revformer `lsh` and HF Reformer `lsh` at equal layers, width,
heads, hashes, buckets and chunk length, each in a fresh process. revformer: MemTracker peak tensor memory and peak
RSS; Reformer: peak RSS only (MemTracker cannot follow its custom autograd Function). glibc is told to return freed
memory at once so that RSS follows live tensors. Results: JSON lines + a Markdown table under
``benchmarks/results/lsh/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "lsh"
MiB = 2**20
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def environment() -> dict:
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cpu", "cpu": cpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------ leak


def leak(args: argparse.Namespace) -> None:
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
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "leak.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, **environment()}) + "\n")


# ---------------------------------------------------------------------------------------------------- memory


def build(kind: str, seq_len: int, chunk: int, ff_chunk: int):
    import torch

    torch.manual_seed(0)
    buckets = max(2, seq_len // chunk // 2 * 2)  # ~one bucket per chunk, even (as scripts/benchmark.py)
    d, layers, heads, vocab = 128, 2, 4, 259
    inter = -(-8 * d // 3 // 8) * 8
    if kind.startswith("revformer"):
        from revformer import RevformerConfig, RevformerForCausalLM

        attention = kind.split("_", 1)[1]
        config = RevformerConfig(
            vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=seq_len, use_cache=False, attention_layers=attention,
            local_chunk_length=chunk, local_num_chunks_before=1, lsh_chunk_length=chunk, lsh_num_buckets=buckets,
            lsh_num_hashes=2, chunk_size_feed_forward=ff_chunk, loss_chunk_size=ff_chunk,
        )  # fmt: skip
        return RevformerForCausalLM(config).train()
    from transformers import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
        attention_head_size=d // heads, feed_forward_size=3 * inter // 2, max_position_embeddings=seq_len,
        attn_layers=["lsh"] * layers, is_decoder=True, axial_pos_embds=False, lsh_attn_chunk_length=chunk,
        lsh_num_chunks_before=1, lsh_num_chunks_after=0, num_hashes=2, num_buckets=buckets,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        chunk_size_lm_head=ff_chunk, chunk_size_feed_forward=ff_chunk, pad_token_id=0, use_cache=False,
    )  # fmt: skip
    return ReformerModelWithLMHead(config).train()


def proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_worker(kind: str, seq_len: int, chunk: int, ff_chunk: int) -> None:
    import torch

    torch.set_num_threads(1)
    model = build(kind, seq_len, chunk, ff_chunk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False, foreach=False)

    def step(ids):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return float(loss)

    step(torch.randint(0, 259, (1, 2 * chunk * 4)))  # optimizer state exists before the measured step
    ids = torch.randint(0, 259, (1, seq_len))
    static = sum(p.numel() * p.element_size() * 4 for p in model.parameters())  # params + grads + 2 Adam moments
    rss_before = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    tracker = None
    if kind.startswith("revformer"):
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(model, optimizer)
    start = time.perf_counter()
    if tracker is not None:
        with tracker:
            loss = step(ids)
    else:
        loss = step(ids)
    record = {"kind": kind, "seq_len": seq_len, "chunk": chunk, "ff_and_loss_chunk": ff_chunk, "loss": loss,
              "step_s": time.perf_counter() - start, "static_bytes": static,
              "rss_peak_bytes": proc_status("VmHWM") - rss_before + static, **environment()}
    if tracker is not None:
        snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        record["memtracker_peak_bytes"] = int({str(getattr(k, "value", k)): v for k, v in snapshot.items()}["Total"])
    print("RESULT " + json.dumps(record), flush=True)


def memory(args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "memory.jsonl"
    records = []
    for seq_len in [int(x) for x in args.lengths.split(",")]:
        for kind in args.kinds.split(","):
            cmd = [sys.executable, __file__, "_worker", kind, str(seq_len), str(args.chunk), str(args.ff_chunk)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV,
                                  "OMP_NUM_THREADS": "1"}, timeout=args.timeout)  # fmt: skip
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            failed = {"kind": kind, "seq_len": seq_len, "error": proc.stderr[-1500:]}
            record = json.loads(lines[0][7:]) if lines else failed
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k not in ("cpu",)}), file=sys.stderr, flush=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(table(records))
    (OUT / "README.md").write_text(table(records) + "\n")


def table(records: list[dict]) -> str:
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


def main(argv: list[str]) -> None:
    if argv[:1] == ["_worker"]:
        memory_worker(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("leak", "memory"))
    p.add_argument("--lengths", default="8192,16384,32768,65536")
    p.add_argument("--kinds", default="revformer_local,revformer_lsh,reformer_lsh")
    p.add_argument("--chunk", type=int, default=128, help="local / lsh chunk length")
    p.add_argument("--ff-chunk", type=int, default=0, help="feed-forward and loss chunk (0 = none)")
    p.add_argument("--threads", type=int, default=2, help="leak: torch threads")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    leak(args) if args.command == "leak" else memory(args)


if __name__ == "__main__":
    main(sys.argv[1:])
