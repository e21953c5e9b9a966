#!/usr/bin/env python
"""Cost of data.document_attention: one forward+backward of the tiny recipe's model on packed blocks (~3 documents
per block), with position_ids restarting at each document and without. Usage: python scripts/benchmark_documents.py

Prints the machine and versions, then the best of 3 timed steps (after one warm-up) for each setting.
"""

from __future__ import annotations

import platform
import time

import torch
import transformers

from revformer import RevformerConfig, RevformerForCausalLM
from revformer.data import document_position_ids

CASES = [("full", 256), ("full", 1024), (["full", "local", "full", "lsh"], 1024)]


def main() -> None:
    torch.set_num_threads(2)
    print(platform.processor() or platform.machine(), "torch", torch.__version__, "transformers",
          transformers.__version__, "threads", torch.get_num_threads())  # fmt: skip
    for kinds, block in CASES:
        config = RevformerConfig(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                 num_attention_heads=4, max_position_embeddings=1024, attention_layers=kinds,
                                 eos_token_id=2)  # fmt: skip
        torch.manual_seed(0)
        model = RevformerForCausalLM(config).train()
        ids = torch.randint(3, 4096, (8, block))
        for row in range(8):  # two EOS at random places: about 3 documents per block
            ids[row, torch.randint(1, block - 1, (2,))] = 2
        positions = document_position_ids(ids, 2)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(4):
            for documents in (True, False):
                start = time.perf_counter()
                model(ids, labels=ids, position_ids=positions if documents else None).loss.backward()
                times[documents].append(time.perf_counter() - start)
        best = {k: min(v[1:]) for k, v in times.items()}
        name = kinds if isinstance(kinds, str) else "mixed " + "/".join(kinds)
        print(f"{name:<26} block {block:>5}: plain {best[False] * 1e3:7.0f} ms, documents {best[True] * 1e3:7.0f} ms,"
              f" ratio {best[True] / best[False]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
