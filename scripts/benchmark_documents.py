#!/usr/bin/env python
"""Cost of data.document_attention: one forward+backward of the tiny recipe's model on packed blocks (~3 documents
per block), with position_ids restarting at each document and without. Usage: python scripts/benchmark_documents.py"""
import sys, time, platform, torch, transformers
from revformer import RevformerConfig, RevformerForCausalLM
from revformer.data import document_position_ids
torch.set_num_threads(2)
print(platform.processor() or platform.machine(), "torch", torch.__version__, "transformers", transformers.__version__)
for kinds, block in [("full", 256), ("full", 1024), (["full", "local", "full", "lsh"], 1024)]:
    cfg = RevformerConfig(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                          max_position_embeddings=1024, attention_layers=kinds, eos_token_id=2)
    torch.manual_seed(0); m = RevformerForCausalLM(cfg).train()
    ids = torch.randint(3, 4096, (8, block)); 
    for b in range(8):
        cuts = torch.randint(1, block - 1, (2,)); ids[b, cuts] = 2
    pos = document_position_ids(ids, 2)
    times = {True: [], False: []}
    for rep in range(4):
        for docs in (True, False):
            t = time.perf_counter(); m(ids, labels=ids, position_ids=pos if docs else None).loss.backward(); times[docs].append(time.perf_counter() - t)
    best = {k: min(v[1:]) for k, v in times.items()}
    print(kinds if isinstance(kinds, str) else "mixed", block, f"plain {best[False]*1e3:.0f} ms  documents {best[True]*1e3:.0f} ms  ratio {best[True]/best[False]:.2f}")
