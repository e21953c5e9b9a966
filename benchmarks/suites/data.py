"""Measure the data pipeline on the embedded stdlib corpus.

Prints the corpus size (documents, UTF-8 bytes, tokens), BPE training time, and the
throughput of tokenization + packing, with library versions and CPU information.
Every stage runs in a fresh cache, then once more to time the cache hit.

    python -m benchmarks data --vocab-size 8192 --train-max-bytes 20000000
    python -m benchmarks data --tiny --out DIR/data   # 40 stdlib files, seconds: the test's run

``--out PREFIX`` also writes PREFIX.jsonl (the figures as one record) and PREFIX.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..env import cpu_name
from ..report import write_jsonl

NAME = "data"

TINY = {"vocab_size": 300, "train_max_bytes": 100_000, "block_size": 128, "files": 40, "chars": 8000}


def _utf8_bytes(ds: Any) -> int:
    return sum(len(t.encode()) for batch in ds.iter(batch_size=512) for t in batch["text"])


def tiny_corpus(folder: Path, files: int, chars: int) -> Path:
    """`files` stdlib modules spread over the whole library, `chars` characters of each, as .txt documents."""
    from revformer.data import stdlib_files

    root, names = stdlib_files()
    folder.mkdir(parents=True, exist_ok=True)
    for rel in names[:: max(1, len(names) // files)][:files]:
        text = (root / rel).read_bytes().decode("utf-8", errors="replace")[:chars]
        (folder / (rel.replace("/", "_") + ".txt")).write_text(text)
    return folder


def markdown(r: dict[str, Any]) -> str:
    return "\n".join([
        "# Data pipeline: load, BPE training, tokenization + packing", "",
        f"{r['cpu']}, {r['cpu_count']} logical cores; python {r['python']}, torch {r['torch']}, datasets "
        f"{r['datasets']}, tokenizers {r['tokenizers']}, transformers {r['transformers']}. Corpus: {r['dataset']}.", "",
        "| documents (train / validation) | UTF-8 bytes (train / validation) | load (s) | BPE vocab | BPE (s) | "
        "tokens (train / validation) | bytes/token | packing (s) | tokens/s | warm rerun (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['documents_train']} / {r['documents_validation']} | {r['bytes_train']:,} / {r['bytes_validation']:,} | "
        f"{r['load_s']:.2f} | {r['vocab']} | {r['bpe_s']:.1f} | {r['tokens_train']:,} / {r['tokens_validation']:,} | "
        f"{r['bytes_per_token']:.2f} | {r['pack_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['rerun_s']:.2f} |", ""])


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--train-max-bytes", type=int, default=20_000_000)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--tiny", action="store_true", help=f"a small slice of the stdlib and small sizes ({TINY})")
    parser.add_argument("--out", type=Path, default=None, help="also write OUT.jsonl and OUT.md")


def run(args: argparse.Namespace) -> None:
    if args.tiny:
        args.vocab_size, args.train_max_bytes, args.block_size = (TINY[k] for k in ("vocab_size", "train_max_bytes",
                                                                                     "block_size"))
    import datasets
    import tokenizers
    import torch
    import transformers

    from revformer.data import DataConfig, load_text_splits, prepare_datasets, stdlib_files
    from revformer.tokenizer import get_tokenizer

    datasets.disable_progress_bars()

    print(f"python {sys.version.split()[0]} | torch {torch.__version__} | datasets {datasets.__version__} | "
          f"tokenizers {tokenizers.__version__} | transformers {transformers.__version__}")
    print(f"cpu: {cpu_name()} | {os.cpu_count()} logical cores | {platform.platform()}")

    with tempfile.TemporaryDirectory() as tmp:
        extra = {}
        if args.tiny:  # a folder of documents: held out by file, as for any local corpus
            corpus = tiny_corpus(Path(tmp) / "corpus", TINY["files"], TINY["chars"])
            extra = {"dataset": str(corpus), "validation_fraction": 0.2}
        cfg = DataConfig(
            vocab_size=args.vocab_size,
            tokenizer_train_max_bytes=args.train_max_bytes,
            block_size=args.block_size,
            num_proc=args.num_proc,
            cache_dir=args.cache_dir or tmp,
            **extra,
        )
        if cfg.dataset == "stdlib":
            root, files = stdlib_files()
            print(f"stdlib corpus: {root}/**/*.py minus site-packages/, pydoc_data/, config-*/, _sysconfigdata_*; "
                  f"{len(files)} files listed (non-UTF-8 files skipped when read)")
            source = "the embedded stdlib corpus"
        else:
            source = f"{TINY['files']} stdlib files, {TINY['chars']} characters each"
            print(f"corpus: {source}")

        t0 = time.perf_counter()
        train_texts, val_texts = load_text_splits(cfg)
        t_load = time.perf_counter() - t0
        train_bytes, val_bytes = _utf8_bytes(train_texts), _utf8_bytes(val_texts)
        print(f"documents: train {len(train_texts)}, validation {len(val_texts)} | "
              f"UTF-8 bytes: train {train_bytes:,}, validation {val_bytes:,} | load {t_load:.2f}s")

        t0 = time.perf_counter()
        tokenizer = get_tokenizer(cfg, train_texts)
        t_tok = time.perf_counter() - t0
        print(f"BPE training: vocab {len(tokenizer)}, {min(args.train_max_bytes, train_bytes):,} bytes, {t_tok:.1f}s")

        t0 = time.perf_counter()
        train, val = prepare_datasets(cfg, tokenizer, (train_texts, val_texts))
        t_pack = time.perf_counter() - t0
        train_tokens, val_tokens = len(train) * cfg.block_size, len(val) * cfg.block_size
        total = train_tokens + val_tokens
        print(f"tokens in packed blocks of {cfg.block_size}: train {train_tokens:,} ({len(train)} blocks), "
              f"validation {val_tokens:,} ({len(val)} blocks) | {train_bytes / train_tokens:.2f} bytes/token")
        print(f"tokenization+packing: {t_pack:.1f}s = {total / t_pack:,.0f} tokens/s "
              f"({(train_bytes + val_bytes) / t_pack / 1e6:.1f} MB/s), num_proc={cfg.num_proc}")

        t0 = time.perf_counter()
        again = load_text_splits(cfg)
        get_tokenizer(cfg, again[0])
        prepare_datasets(cfg, tokenizer, again)
        t_rerun = time.perf_counter() - t0
        print(f"rerun with warm cache (load + tokenizer + packing): {t_rerun:.2f}s")

    if args.out:
        record = {
            "dataset": source, "documents_train": len(train_texts), "documents_validation": len(val_texts),
            "bytes_train": train_bytes, "bytes_validation": val_bytes, "load_s": t_load, "vocab": len(tokenizer),
            "bpe_bytes": min(args.train_max_bytes, train_bytes), "bpe_s": t_tok, "block_size": cfg.block_size,
            "blocks_train": len(train), "blocks_validation": len(val), "tokens_train": train_tokens,
            "tokens_validation": val_tokens, "bytes_per_token": train_bytes / train_tokens, "pack_s": t_pack,
            "tokens_per_s": total / t_pack, "num_proc": cfg.num_proc, "rerun_s": t_rerun, "ok": True,
            "python": sys.version.split()[0], "torch": torch.__version__, "datasets": datasets.__version__,
            "tokenizers": tokenizers.__version__, "transformers": transformers.__version__, "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(args.out.with_suffix(".jsonl"), [record])
        args.out.with_suffix(".md").write_text(markdown(record))
