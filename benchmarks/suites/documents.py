"""Cost of data.document_attention: one forward+backward of the tiny recipe's model on packed blocks (~3 documents
per block), with position_ids restarting at each document and without.

    python -m benchmarks documents
    python -m benchmarks documents --tiny --out DIR/documents   # a tiny model: the test's run

Prints the machine and versions, then the best of 3 timed steps (after one warm-up) for each setting, the two
settings interleaved. ``--out PREFIX`` also writes PREFIX.jsonl (one record per case) and PREFIX.md; ``--tiny``: a
4 x 32 model on 2 x 64 tokens (the test's run).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

from ..probes import interleaved_times
from ..report import write_jsonl

NAME = "documents"

CASES = [("full", 256), ("full", 1024), (["full", "local", "full", "lsh"], 1024)]
MODEL = dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=1024)
BATCH = 8
TINY_CASES = [("full", 64), (["full", "local", "full", "lsh"], 64)]
TINY_MODEL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                  max_position_embeddings=64, local_chunk_length=16, lsh_chunk_length=16, lsh_num_buckets=4)
TINY_BATCH = 2


def measure(kinds: str | list[str], block: int, model_sizes: dict[str, Any], batch: int) -> dict[str, Any]:
    """Best forward+backward time with and without document position_ids on one batch of packed blocks."""
    import torch

    from revformer import RevformerConfig, RevformerForCausalLM
    from revformer.data import document_position_ids

    config = RevformerConfig(**model_sizes, attention_layers=kinds, eos_token_id=2)
    torch.manual_seed(0)
    model = RevformerForCausalLM(config).train()
    vocab = model_sizes["vocab_size"]
    ids = torch.randint(3, vocab, (batch, block))
    for row in range(batch):  # two EOS at random places: about 3 documents per block
        ids[row, torch.randint(1, block - 1, (2,))] = 2
    positions = document_position_ids(ids, 2)

    def step(documents: bool) -> None:
        model(ids, labels=ids, position_ids=positions if documents else None).loss.backward()

    times = interleaved_times({True: lambda: step(True), False: lambda: step(False)}, repeats=3, warmup=1)
    best = {k: min(v) for k, v in times.items()}
    name = kinds if isinstance(kinds, str) else "mixed " + "/".join(kinds)
    return {"attention": name, "block": block, "batch": batch, "plain_s": best[False], "documents_s": best[True],
            "ratio": best[True] / best[False], "ok": True}


def markdown(header: str, records: list[dict[str, Any]]) -> str:
    lines = ["# Cost of data.document_attention (forward+backward, best of 3)", "", header, "",
             "| attention | batch x block | plain (ms) | documents (ms) | ratio |", "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['attention']} | {r['batch']} x {r['block']} | {r['plain_s'] * 1e3:.0f} | "
                     f"{r['documents_s'] * 1e3:.0f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="a tiny model and blocks (the test's run)")
    p.add_argument("--out", type=Path, default=None, help="also write OUT.jsonl and OUT.md")


def run(args: argparse.Namespace) -> None:
    import torch
    import transformers

    torch.set_num_threads(2)
    machine = platform.processor() or platform.machine()
    print(machine, "torch", torch.__version__, "transformers", transformers.__version__, "threads",
          torch.get_num_threads())  # fmt: skip
    cases, sizes, batch = (TINY_CASES, TINY_MODEL, TINY_BATCH) if args.tiny else (CASES, MODEL, BATCH)
    records = []
    for kinds, block in cases:
        r = measure(kinds, block, sizes, batch)
        records.append({**r, "cpu": machine, "torch": torch.__version__, "transformers": transformers.__version__,
                        "threads": torch.get_num_threads()})
        print(f"{r['attention']:<26} block {block:>5}: plain {r['plain_s'] * 1e3:7.0f} ms, documents "
              f"{r['documents_s'] * 1e3:7.0f} ms, ratio {r['ratio']:.2f}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(args.out.with_suffix(".jsonl"), records)
        header = (f"{machine}, torch {torch.__version__}, transformers {transformers.__version__}, "
                  f"{torch.get_num_threads()} threads; ~3 documents per block.")
        args.out.with_suffix(".md").write_text(markdown(header, records))
