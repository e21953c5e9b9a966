"""Measure the data pipeline on the embedded stdlib corpus.

Prints the corpus size (documents, UTF-8 bytes, tokens), BPE training time, and the
throughput of tokenization + packing, with library versions and CPU information.
Every stage runs in a fresh cache, then once more to time the cache hit.

    python scripts/benchmark_data.py --vocab-size 8192 --train-max-bytes 20000000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import datasets
import tokenizers
import torch
import transformers
from bench_env import cpu_name

from revformer.data import DataConfig, load_text_splits, prepare_datasets, stdlib_files
from revformer.tokenizer import get_tokenizer


def _utf8_bytes(ds: datasets.Dataset) -> int:
    return sum(len(t.encode()) for batch in ds.iter(batch_size=512) for t in batch["text"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--train-max-bytes", type=int, default=20_000_000)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()
    datasets.disable_progress_bars()

    print(f"python {sys.version.split()[0]} | torch {torch.__version__} | datasets {datasets.__version__} | "
          f"tokenizers {tokenizers.__version__} | transformers {transformers.__version__}")
    print(f"cpu: {cpu_name()} | {os.cpu_count()} logical cores | {platform.platform()}")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataConfig(
            vocab_size=args.vocab_size,
            tokenizer_train_max_bytes=args.train_max_bytes,
            block_size=args.block_size,
            num_proc=args.num_proc,
            cache_dir=args.cache_dir or tmp,
        )
        root, files = stdlib_files()
        print(f"stdlib corpus: {root}/**/*.py minus site-packages/, pydoc_data/, config-*/, _sysconfigdata_*; "
              f"{len(files)} files listed (non-UTF-8 files skipped when read)")

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
        print(f"rerun with warm cache (load + tokenizer + packing): {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
