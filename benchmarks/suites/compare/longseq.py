"""``compare --suite longseq``: revformer's peak memory of one training step against length for full / local / lsh
attention, with and without feed-forward and loss chunking."""

from __future__ import annotations

import argparse
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

from ...report import MiB, mib, pyplot, read_records, save_figure
from ...runner import Runner
from .common import base_spec

CPU = {"hidden_size": 128, "num_heads": 4, "num_layers": 2, "lengths": [4096, 8192, 16384, 32768, 65536],
       "full_max_len": 32768, "chunk": 1024, "attn_chunk": 128}
CUDA = {"hidden_size": 512, "num_heads": 8, "num_layers": 4, "lengths": [2**k for k in range(14, 21)],
        "full_max_len": 2**20, "chunk": 4096, "attn_chunk": 256}
ATTENTIONS = ("full", "local", "lsh")


def run(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """revformer's peak memory against length, per attention kind (`attentions`, default all), without and with
    chunking."""
    for attention in sizes.get("attentions", ATTENTIONS):
        for chunk in (0, sizes["chunk"]):
            for seq_len in sizes["lengths"]:
                if attention == "full" and seq_len > sizes["full_max_len"]:
                    continue
                spec = base_spec(args, sizes, "revformer", attention=attention, chunk=chunk, seq_len=seq_len)
                runner.memory(spec, "longseq")
    print(growth_table(read_records(runner.out / "longseq.jsonl")), file=sys.stderr)


def growth_table(records: list[dict[str, Any]]) -> str:
    """Peak memory per attention kind and chunking against length, with the growth ratio per doubling."""
    rows: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for r in records:
        if r.get("mode") == "memory" and r.get("ok"):
            rows.setdefault((r["spec"]["attention"], r["spec"]["chunk"]), {})[r["spec"]["seq_len"]] = r
    lengths = sorted({t for row in rows.values() for t in row})
    header = " | ".join(f"{t // 1024}K" for t in lengths)
    lines = [f"| attention | chunking | {header} | growth per doubling | linear? |",
             "|---" * (len(lengths) + 4) + "|"]
    for (attention, chunk), row in sorted(rows.items()):
        ts = sorted(row)
        ratios = [row[b]["activation_bytes"] / row[a]["activation_bytes"] for a, b in pairwise(ts) if b == 2 * a]
        linear = "n/a" if not ratios else ("yes" if max(ratios) <= 2.2 else "no")
        cells = [mib(row[t]["peak_bytes"]) if t in row else "–" for t in lengths]
        growth = ", ".join(f"{x:.2f}" for x in ratios) or "–"
        lines.append(f"| {attention} | {'ff+loss ' + str(chunk) if chunk else 'none'} | " + " | ".join(cells)
                     + f" | {growth} | {linear} |")
    return "\n".join(lines)


def markdown(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    longseq = [r for r in res.get("longseq", []) if "spec" in r]  # not the suite's summary line
    if not longseq:
        return []
    s = longseq[0]["spec"]
    return [(f"## Long sequences: revformer peak memory (MiB) by attention kind (d={s['hidden_size']}, "
             f"{s['num_layers']} layers, chunk length {s['attn_chunk']})"), "",
            "Growth per doubling = activation(2T) / activation(T); linear when <= 2.2.", "",
            growth_table(res["longseq"]), ""]


def plot(out: Path, res: dict[str, list[dict[str, Any]]]) -> None:
    longseq = [r for r in res.get("longseq", []) if r.get("mode") == "memory" and r.get("ok")]
    if not longseq:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple[str, int], dict[int, float]] = {}
    for r in longseq:
        groups.setdefault((r["spec"]["attention"], r["spec"]["chunk"]), {})[r["spec"]["seq_len"]] = r["peak_bytes"]
    for (attention, chunk), rows in sorted(groups.items()):
        xs = sorted(rows)
        ax.plot(xs, [rows[x] / MiB for x in xs], "o-" if chunk else "o--",
                label=f"{attention}, {'chunked ' + str(chunk) if chunk else 'no chunking'}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="peak MiB",
           title="revformer (reversible): peak memory vs length")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out / "longseq_memory_vs_length.png")
