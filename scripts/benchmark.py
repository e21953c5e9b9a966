#!/usr/bin/env python
"""Benchmarks for revformer: memory, speed, longest sequence and quality against standard baselines.

Models compared at the same width, depth, heads, vocabulary and sequence length:

- ``revformer``: RevformerForCausalLM, reversible engine;
- ``revformer_plain``: the same model with ``reversible=False`` (ordinary autograd);
- ``llama`` / ``llama_ckpt``: Hugging Face LlamaForCausalLM (sdpa), without / with activation checkpointing;
- ``reformer``: Hugging Face ReformerModelWithLMHead (local attention, causal).

Suites (``--suite``, comma-separated, or ``all``):

- ``depth``: peak memory and step time of one training step (forward, backward, AdamW) against depth;
- ``core``: reversible / plain step-time ratio at 12 layers and activation memory at 2/12/24 layers;
- ``length``: longest trainable sequence per model (doubling, then bisection) under a memory budget (CPU) or
  until real out-of-memory (CUDA); every probe is also a point of memory against length;
- ``longseq``: revformer's peak memory against length for full / local / lsh attention, with and without chunking;
- ``quality``: validation bits per byte of revformer (reversible and plain) and a Llama of equal parameter count,
  trained on the same bytes for the same tokens.

Every measurement runs in a fresh process (``benchmark.py _worker '<json>'``) so no run's memory leaks into the
next. Memory on CUDA is ``torch.cuda.max_memory_allocated``; on CPU both MemTracker's peak tensor memory and the
process's peak RSS (glibc told to return freed memory at once, so RSS follows live tensors) are reported. Timing
runs are separate processes with the normal allocator, and time the models of one configuration round-robin in the
same process, so their ratios share the machine's noise. Results: ``benchmarks/results/<device>/`` (JSON lines,
PNG plots, README.md with tables and targets); ``benchmark.py report`` re-renders them from the JSON lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODELS = ("revformer", "revformer_plain", "llama", "llama_ckpt", "reformer")
LABELS = {
    "revformer": "revformer (reversible)",
    "revformer_plain": "revformer (reversible=False)",
    "llama": "Llama",
    "llama_ckpt": "Llama + checkpointing",
    "reformer": "HF Reformer (local)",
}
SUITES = ("depth", "core", "length", "longseq", "quality", "memory", "cost")
# Plot style per model (colour, marker, line): overlapping curves stay visible.
STYLES = {"revformer": ("C0", "o", "-"), "revformer_plain": ("C1", "s", "--"), "llama": ("C2", "^", "-"),
          "llama_ckpt": ("C3", "v", "--"), "reformer": ("C4", "D", ":")}
RESULT_PREFIX = "BENCH_RESULT "
WRITE_LOCK = threading.Lock()
MiB = 2**20
# glibc: serve allocations above 128 KiB with mmap and trim the heap above 128 KiB, so that freed tensor memory
# leaves the process at once and peak RSS tracks live tensor memory (several times slower: memory runs only).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# ----------------------------------------------------------------------------------------------- configuration


@dataclass
class Spec:
    """One model configuration for one training step."""

    model: str
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 0  # 0: SwiGLU default, 8/3 * hidden_size rounded up to a multiple of 8
    vocab_size: int = 259  # byte-level: 256 bytes + 3 specials
    seq_len: int = 1024
    batch_size: int = 1
    attention: str = "full"  # revformer's kernel: full | local | lsh (Reformer is always local)
    attn_chunk: int = 128  # local / lsh chunk length (revformer and Reformer)
    chunk: int | None = None  # revformer chunk_size_feed_forward and loss_chunk_size (0 = none, None = defaults)
    ff_chunk: int | None = None  # chunk_size_feed_forward alone, overriding `chunk`
    loss_chunk: int | None = None  # loss_chunk_size alone, overriding `chunk`
    device: str = "cpu"
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {MODELS}")
        if not self.intermediate_size:
            self.intermediate_size = -(-8 * self.hidden_size // 3 // 8) * 8

    def replace(self, **changes: Any) -> Spec:
        return dataclasses.replace(self, **changes)


@dataclass
class Defaults:
    """Default sizes of every suite on one device type (CPU sizes fit a ~25 minute run on 2 cores)."""

    depth: dict[str, Any]
    core: dict[str, Any]
    length: dict[str, Any]
    longseq: dict[str, Any]
    quality: dict[str, Any]
    memory: dict[str, Any]
    cost: dict[str, Any]


DEFAULTS = {
    "cpu": Defaults(
        depth={"hidden_size": 128, "num_heads": 4, "seq_len": 1024, "depths": [2, 12, 24, 48], "steps": 3},
        core={"hidden_size": 256, "num_heads": 4, "seq_len": 2048, "depths": [2, 12, 24], "time_depth": 12, "steps": 7},
        length={"hidden_size": 128, "num_heads": 4, "num_layers": 8, "start": 1024, "max_len": 65536,
                "budget_gib": 0.125},
        longseq={"hidden_size": 128, "num_heads": 4, "num_layers": 2, "lengths": [4096, 8192, 16384, 32768, 65536],
                     "full_max_len": 32768, "chunk": 1024, "attn_chunk": 128},
        quality={"hidden_size": 128, "num_heads": 4, "num_layers": 4, "seq_len": 256, "batch_size": 8, "steps": 250,
                 "lr": 3e-3, "eval_every": 50, "val_blocks": 512},
        memory={"hidden_size": 256, "num_heads": 4, "num_layers": 8, "vocab_size": 8192,
                "lengths": [4096, 8192, 16384],
                "max_len": {"revformer_no_chunking": 8192, "revformer_ff_chunks_only": 8192,
                            "revformer_loss_chunks_only": 8192},
                "longest": ["revformer", "llama", "llama_ckpt", "reformer"], "budget_gib": 0.25, "start": 1024,
                "longest_max_len": 32768},
        cost={"hidden_size": 256, "num_heads": 4, "num_layers": 12, "vocab_size": 8192, "seq_len": 4096, "steps": 7},
    ),
    "cuda": Defaults(
        depth={"hidden_size": 1024, "num_heads": 16, "seq_len": 4096, "depths": [2, 6, 12, 24, 48], "steps": 10},
        core={"hidden_size": 1024, "num_heads": 16, "seq_len": 4096, "depths": [2, 12, 24], "time_depth": 12,
              "steps": 20},
        length={"hidden_size": 1024, "num_heads": 16, "num_layers": 12, "start": 4096, "max_len": 2**21,
                "budget_gib": None},
        longseq={"hidden_size": 512, "num_heads": 8, "num_layers": 4, "lengths": [2**k for k in range(14, 21)],
                     "full_max_len": 2**20, "chunk": 4096, "attn_chunk": 256},
        quality={"hidden_size": 256, "num_heads": 8, "num_layers": 6, "seq_len": 512, "batch_size": 16, "steps": 2000,
                 "lr": 2e-3, "eval_every": 200, "val_blocks": 2048},
        memory={"hidden_size": 1024, "num_heads": 16, "num_layers": 12, "vocab_size": 32000,
                "lengths": [8192, 16384, 32768, 65536, 131072], "max_len": {"llama": 32768},
                "longest": ["revformer", "revformer_no_chunking", "llama", "llama_ckpt", "reformer"],
                "budget_gib": None, "start": 8192, "longest_max_len": 2**21},
        cost={"hidden_size": 1024, "num_heads": 16, "num_layers": 12, "vocab_size": 32000, "seq_len": 8192,
              "steps": 10},
    ),
}


# ------------------------------------------------------------------------------------- worker: models and steps


def build_model(spec: Spec) -> Any:
    """The model `spec.model`, seeded, in training mode, on `spec.device` (fp32 weights)."""
    import torch

    torch.manual_seed(spec.seed)
    common = {"vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
                  "num_attention_heads": spec.num_heads, "max_position_embeddings": spec.seq_len, "use_cache": False}
    if spec.model.startswith("revformer"):
        from revformer import RevformerConfig, RevformerForCausalLM

        buckets = max(2, spec.seq_len // spec.attn_chunk // 2 * 2)  # ~one bucket per chunk, even
        chunks = {"chunk_size_feed_forward": spec.chunk if spec.ff_chunk is None else spec.ff_chunk,
                  "loss_chunk_size": spec.chunk if spec.loss_chunk is None else spec.loss_chunk}
        config = RevformerConfig(
            **common, intermediate_size=spec.intermediate_size, reversible=spec.model == "revformer",
            attention_layers=spec.attention, local_chunk_length=spec.attn_chunk, lsh_chunk_length=spec.attn_chunk,
            lsh_num_buckets=buckets, lsh_num_hashes=2, **{k: v for k, v in chunks.items() if v is not None},
        )  # fmt: skip
        model = RevformerForCausalLM(config)
    elif spec.model.startswith("llama"):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**common, intermediate_size=spec.intermediate_size, num_key_value_heads=spec.num_heads,
                             tie_word_embeddings=True, attn_implementation="sdpa")
        model = LlamaForCausalLM(config)
        if spec.model == "llama_ckpt":
            model.activation_checkpointing_enable()
    else:
        from transformers import ReformerConfig, ReformerModelWithLMHead

        # Its feed-forward has 2 matrices (SwiGLU has 3): 1.5x wider gives the same parameters per layer.
        config = ReformerConfig(
            **common, feed_forward_size=3 * spec.intermediate_size // 2,
            attention_head_size=spec.hidden_size // spec.num_heads,
            attn_layers=["local"] * spec.num_layers, is_decoder=True, axial_pos_embds=False,
            local_attn_chunk_length=spec.attn_chunk, local_num_chunks_before=1, local_num_chunks_after=0,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
            lsh_attention_probs_dropout_prob=0.0, chunk_size_lm_head=0, pad_token_id=0,
        )  # fmt: skip
        model = ReformerModelWithLMHead(config)
    return model.to(spec.device).train()


def make_optimizer(model: Any, lr: float = 1e-4, weight_decay: float = 0.0) -> Any:
    """AdamW, fused (one kernel per step, no foreach temporaries, so it never sets the peak)."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=True)


def autocast(spec: Spec) -> Any:
    import torch

    return torch.autocast(spec.device.split(":")[0], dtype=torch.bfloat16, enabled=spec.dtype == "bf16")


def forward_backward(model: Any, ids: Any, spec: Spec) -> Any:
    """Forward with labels and backward; the loss, detached."""
    with autocast(spec):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def train_step(model: Any, optimizer: Any, ids: Any, spec: Spec, clip: float | None = None) -> float:
    """One full training step: forward with labels, backward, (clip,) optimizer step, zero grads."""
    import torch

    loss = forward_backward(model, ids, spec)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def random_ids(spec: Spec, seq_len: int | None = None) -> Any:
    import torch

    generator = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(3, spec.vocab_size, (spec.batch_size, seq_len or spec.seq_len), generator=generator)
    return ids.to(spec.device)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def setup_worker(spec: Spec) -> None:
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(spec.threads)
    # Deep models drive some Adam moments into denormals, which are ~100x slower on x86: flush them to zero.
    torch.set_flush_denormal(True)


def environment(device: str, threads: int) -> dict[str, Any]:
    """Versions and hardware of this process, stored with every measurement."""
    import platform

    import torch
    import transformers
    from bench_env import cpu_name

    cpu = cpu_name()
    env = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads}
    if device.startswith("cuda"):
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env


def param_stats(model: Any, optimizer: Any | None = None) -> dict[str, int]:
    """Parameter count and the bytes of parameters, gradients (one per trainable parameter) and optimizer state."""
    import torch

    params = list(model.parameters())
    state = 0
    if optimizer is not None:
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v))
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return {"params": sum(p.numel() for p in params), "param_bytes": param_bytes, "grad_bytes": grad_bytes,
            "optimizer_state_bytes": state, "static_bytes": param_bytes + grad_bytes + state}


def proc_status(key: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def emit(record: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def memory_worker(spec: Spec, budget: int | None, warmup_len: int, with_optimizer: bool = True) -> None:
    """Peak memory of one training step at `spec.seq_len`, after a short warm-up step that creates the optimizer
    state; without the optimizer (`with_optimizer=False`), of one forward+backward from zeroed (None) gradients, so
    optimizer state cannot hide activations. CPU: MemTracker (where it works) and peak RSS; a watchdog stops the
    step once RSS passes `budget`. CUDA: max_memory_allocated; out-of-memory is caught and reported."""
    import threading

    import torch

    setup_worker(spec)
    cuda = spec.device.startswith("cuda")
    record: dict[str, Any] = {"mode": "memory", "spec": dataclasses.asdict(spec), "with_optimizer": with_optimizer}
    record.update(environment(spec.device, spec.threads))
    model = build_model(spec)
    optimizer = make_optimizer(model) if with_optimizer else None
    warmup_ids = random_ids(spec, min(spec.seq_len, warmup_len))
    if optimizer is not None:
        train_step(model, optimizer, warmup_ids, spec)
    else:
        forward_backward(model, warmup_ids, spec)
        model.zero_grad(set_to_none=True)
    stats = param_stats(model, optimizer)
    step = (lambda: train_step(model, optimizer, ids, spec)) if optimizer else (
        lambda: float(forward_backward(model, ids, spec)))
    record.update(stats, budget_bytes=budget)
    resident = stats["param_bytes"] + stats["optimizer_state_bytes"]  # alive before the step starts
    ids = random_ids(spec)

    tracker, done = None, threading.Event()
    if cuda:
        synchronize(spec.device)
        torch.cuda.reset_peak_memory_stats()
    else:
        if spec.model != "reformer":  # MemTracker asserts on Reformer's custom autograd Function
            from torch.distributed._tools.mem_tracker import MemTracker

            tracker = MemTracker()
            tracker.track_external(*(m for m in (model, optimizer) if m is not None))
        rss_before = proc_status("VmRSS")
        reset_peak_rss()
        if budget is not None:

            def watchdog() -> None:  # stop a step that will not fit instead of running it to the end
                while not done.wait(0.02):
                    used = proc_status("VmHWM") - rss_before + resident
                    if used > budget:
                        record.update(ok=False, over_budget=True, stopped_early=True, rss_peak_bytes=used,
                                      peak_bytes=used, peak_source="rss")
                        emit(record)
                        os._exit(0)

            threading.Thread(target=watchdog, daemon=True).start()

    start = time.perf_counter()
    try:
        if tracker is not None:
            with tracker:
                loss = step()
        else:
            loss = step()
        synchronize(spec.device)
    except torch.OutOfMemoryError:
        record.update(ok=False, over_budget=True, oom=True)
        emit(record)
        return
    finally:
        done.set()
    record.update(ok=True, loss=loss, step_s_tracked=time.perf_counter() - start)
    if cuda:
        record.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_source="cuda_max_memory_allocated")
    else:
        record["rss_peak_bytes"] = proc_status("VmHWM") - rss_before + resident
        record["rss_hwm_bytes"] = proc_status("VmHWM")
        if tracker is not None:
            snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
            parts = {str(getattr(k, "value", k)): int(v) for k, v in snapshot.items()}
            record.update(memtracker_peak_bytes=parts["Total"], memtracker_breakdown=parts)
            record.update(peak_bytes=parts["Total"], peak_source="memtracker")
        else:
            record.update(peak_bytes=record["rss_peak_bytes"], peak_source="rss")
    record["activation_bytes"] = record["peak_bytes"] - stats["static_bytes"]
    record["growth_bytes"] = record["peak_bytes"] - resident  # what the step added: activations (+ gradients)
    judged = record["peak_bytes"] if cuda else record["rss_peak_bytes"]
    record["over_budget"] = budget is not None and judged > budget
    emit(record)


def time_worker(specs: list[Spec], warmup: int, steps: int) -> None:
    """Median step time of each spec; all models live in this process and are stepped round-robin."""
    setup_worker(specs[0])
    env = environment(specs[0].device, specs[0].threads)
    runs = []
    for spec in specs:
        model = build_model(spec)
        optimizer = make_optimizer(model)
        runs.append((spec, model, optimizer, random_ids(spec), []))
    for i in range(warmup + steps):
        for spec, model, optimizer, ids, times in runs:
            synchronize(spec.device)
            start = time.perf_counter()
            train_step(model, optimizer, ids, spec)
            synchronize(spec.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    for spec, model, optimizer, ids, times in runs:
        median = statistics.median(times)
        emit({"mode": "time", "spec": dataclasses.asdict(spec), **env, **param_stats(model, optimizer), "ok": True,
              "step_s": median, "step_times_s": times, "tokens_per_s": spec.batch_size * spec.seq_len / median,
              "warmup_steps": warmup})


# -------------------------------------------------------------------------------------------- worker: quality


@dataclass
class Corpus:
    """Training and validation blocks of `seq_len` tokens, and the UTF-8 bytes each validation block predicts."""

    source: str
    vocab_size: int
    train: Callable[[int, int], Any]  # (step, batch) -> (batch, seq_len) int64 tensor, deterministic
    val: Any  # (num_blocks, seq_len) int64 tensor
    val_bytes: list[int]


def stdlib_byte_corpus(seq_len: int, seed: int, val_blocks: int, fraction: float = 0.02) -> Corpus:
    """Self-contained byte-level stream of the Python stdlib sources (site-packages excluded); files are held out
    by a stable hash of their relative path. Every predicted token is one byte."""
    import hashlib
    import sysconfig

    import numpy as np
    import torch

    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/", 1)[0] in ("site-packages", "dist-packages"):
            continue
        held_out = int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "big") / 2**64 < fraction
        parts[held_out].append(path.read_bytes())
    train = np.frombuffer(b"".join(parts[False]), dtype=np.uint8)
    val = np.frombuffer(b"".join(parts[True]), dtype=np.uint8)
    n_val = min(val_blocks, len(val) // seq_len)
    val_t = torch.from_numpy(val[: n_val * seq_len].astype(np.int64)).view(n_val, seq_len)

    def batch(step: int, size: int) -> Any:
        starts = np.random.default_rng([seed, step]).integers(0, len(train) - seq_len, size)
        return torch.from_numpy(np.stack([train[s : s + seq_len] for s in starts]).astype(np.int64))

    return Corpus("builtin stdlib bytes", 256, batch, val_t, [seq_len - 1] * n_val)


def project_corpus(seq_len: int, seed: int, val_blocks: int) -> Corpus:
    """The project's data pipeline (revformer.data): stdlib corpus, byte tokenizer, packed blocks."""
    import numpy as np
    import torch

    from revformer.data import DataConfig, load_text_splits, prepare_datasets
    from revformer.tokenizer import get_tokenizer

    cfg = DataConfig(dataset="stdlib", tokenizer="byte", block_size=seq_len)
    splits = load_text_splits(cfg)
    tokenizer = get_tokenizer(cfg, splits[0])
    train_ds, val_ds = prepare_datasets(cfg, tokenizer, splits)
    train_np, val_np = train_ds.with_format("numpy"), val_ds.with_format("numpy")
    pick = np.linspace(0, len(val_np) - 1, min(val_blocks, len(val_np))).astype(int).tolist()
    val = val_np[pick]

    def batch(step: int, size: int) -> Any:
        rows = np.random.default_rng([seed, step]).integers(0, len(train_np), size).tolist()
        return torch.from_numpy(np.asarray(train_np[rows]["input_ids"], dtype=np.int64))

    return Corpus("revformer.data (stdlib, byte tokenizer)", len(tokenizer), batch,
                  torch.from_numpy(np.asarray(val["input_ids"], dtype=np.int64)), [int(b) for b in val["num_bytes"]])


def load_corpus(source: str, seq_len: int, seed: int, val_blocks: int) -> Corpus:
    """`project` (revformer.data), `builtin`, or `auto`: the project pipeline when it imports, else builtin."""
    if source in ("auto", "project"):
        try:
            return project_corpus(seq_len, seed, val_blocks)
        except ImportError:
            if source == "project":
                raise
    return stdlib_byte_corpus(seq_len, seed, val_blocks)


def evaluate_bpb(model: Any, corpus: Corpus, spec: Spec, blocks: int | None = None, batch: int = 16) -> float:
    """Validation bits per byte: summed next-token cross-entropy (nats) / (ln 2 * UTF-8 bytes predicted)."""
    import torch

    val = corpus.val[:blocks] if blocks else corpus.val
    n_bytes = sum(corpus.val_bytes[: len(val)])
    nats = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(val), batch):
            ids = val[i : i + batch].to(spec.device)
            with autocast(spec):
                loss = model(input_ids=ids, labels=ids).loss  # mean over the (T - 1) predicted tokens per row
            nats += float(loss) * ids.shape[0] * (ids.shape[1] - 1)
    model.train()
    return nats / (math.log(2) * n_bytes)


def train_worker(spec: Spec, steps: int, lr: float, eval_every: int, val_blocks: int, data: str,
                 curve_blocks: int = 32, stop_after: int | None = None) -> None:
    """Train `spec.model` for `steps` steps on the stdlib bytes and report loss curves and validation bpb (the
    curve on `curve_blocks` validation blocks, the end on all `val_blocks`), and for the reversible model the
    reconstruction error of its trained weights. `stop_after` ends the run early on the same `steps`-long
    schedule, so its curve is comparable point by point with a full run's."""
    import torch

    setup_worker(spec)
    corpus = load_corpus(data, spec.seq_len, spec.seed, val_blocks)
    spec = spec.replace(vocab_size=corpus.vocab_size)
    model = build_model(spec)
    optimizer = make_optimizer(model, lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    curve_blocks = min(curve_blocks, len(corpus.val))
    losses, val_curve = [], []
    start = time.perf_counter()
    for step in range(stop_after or steps):
        losses.append(train_step(model, optimizer, corpus.train(step, spec.batch_size).to(spec.device), spec, clip=1.0))
        scheduler.step()
        if (step + 1) % eval_every == 0 or step + 1 == (stop_after or steps):
            val_curve.append([step + 1, evaluate_bpb(model, corpus, spec, curve_blocks)])
    train_s = time.perf_counter() - start
    emit({"mode": "train", "spec": dataclasses.asdict(spec), **environment(spec.device, spec.threads),
          **param_stats(model), "ok": True, "data": corpus.source, "steps": steps, "lr": lr,
          "stopped_at": stop_after or steps, "tokens": (stop_after or steps) * spec.batch_size * spec.seq_len, "train_s": train_s, "train_losses": losses,
          "val_bpb_curve": val_curve, "val_curve_blocks": curve_blocks, "val_blocks": len(corpus.val),
          "val_bytes": sum(corpus.val_bytes), "val_bpb": evaluate_bpb(model, corpus, spec),
          "reconstruction_error": reconstruction_error(model, corpus, spec)})


def reconstruction_error(model: Any, corpus: Corpus, spec: Spec) -> float | None:
    """max |x - x'| of the trained reversible model on 8 validation blocks (None for other models)."""
    if spec.model != "revformer":
        return None
    model.eval()
    with autocast(spec):
        error = model.model.reconstruction_error(corpus.val[:8].to(spec.device))
    model.train()
    return error


def worker_main(payload: dict[str, Any]) -> None:
    mode = payload["mode"]
    if mode == "memory":
        memory_worker(Spec(**payload["spec"]), payload.get("budget"), payload.get("warmup_len", 256),
                      payload.get("with_optimizer", True))
    elif mode == "time":
        time_worker([Spec(**s) for s in payload["specs"]], payload["warmup"], payload["steps"])
    elif mode == "train":
        train_worker(Spec(**payload["spec"]), payload["steps"], payload["lr"], payload["eval_every"],
                     payload["val_blocks"], payload["data"], payload.get("curve_blocks", 32), payload.get("stop_after"))
    else:
        raise ValueError(f"unknown worker mode {mode!r}")


# ------------------------------------------------------------------------------------------ parent: orchestration


@dataclass
class Runner:
    """Launches workers and appends their records to the suite's JSON-lines file."""

    out: Path
    timeout: float
    log: list[str] = field(default_factory=list)

    def launch(self, payload: dict[str, Any], suite: str, memory: bool, **tags: Any) -> list[dict[str, Any]]:
        env = dict(os.environ)
        spec = payload.get("spec") or payload["specs"][0]
        env["OMP_NUM_THREADS"] = str(spec["threads"])
        if memory and spec["device"] == "cpu":
            env.update(MALLOC_ENV)
        cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", json.dumps(payload)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, check=False, capture_output=True, text=True, env=env, timeout=self.timeout, cwd=REPO
            )
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out, err, rc = exc.stdout or "", f"timed out after {self.timeout} s", None
            out = out.decode() if isinstance(out, bytes) else out
        records = [json.loads(line[len(RESULT_PREFIX):]) for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
        if not records:
            records = [{"mode": payload["mode"], "spec": spec, "ok": False, "returncode": rc,
                        "error": (err or "")[-2000:]}]
        wall = time.perf_counter() - start
        with WRITE_LOCK, open(self.out / f"{suite}.jsonl", "a") as f:  # whole lines when runners share a file
            for record in records:
                record.update(suite=suite, worker_wall_s=round(wall, 2),
                              timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              **tags)
                f.write(json.dumps(record) + "\n")
                self.log.append(describe(record))
                print(self.log[-1], file=sys.stderr, flush=True)
        return records

    def memory(self, spec: Spec, suite: str, budget: int | None = None, with_optimizer: bool = True,
               **tags: Any) -> dict[str, Any]:
        payload = {"mode": "memory", "spec": dataclasses.asdict(spec), "budget": budget,
                   "with_optimizer": with_optimizer}
        return self.launch(payload, suite, True, **tags)[0]

    def time(self, specs: list[Spec], suite: str, steps: int, warmup: int = 1, **tags: Any) -> list[dict[str, Any]]:
        payload = {"mode": "time", "specs": [dataclasses.asdict(s) for s in specs], "warmup": warmup, "steps": steps}
        return self.launch(payload, suite, False, **tags)


def describe(r: dict[str, Any]) -> str:
    s = r.get("spec", {})
    head = (f"[{r.get('suite')}] {r.get('mode')} {r.get('variant') or s.get('model')} L={s.get('num_layers')} "
            f"T={s.get('seq_len')}")
    if s.get("attention", "full") != "full" or s.get("chunk"):
        head += f" attn={s.get('attention')} chunk={s.get('chunk')}"
    if not r.get("ok") and not r.get("over_budget"):
        return f"{head}: FAILED rc={r.get('returncode')} {r.get('error', '')[-300:]}"
    parts = [head + ":"]
    if "peak_bytes" in r:
        parts.append(f"peak {r['peak_bytes'] / MiB:.1f} MiB ({r.get('peak_source')})")
    if "rss_peak_bytes" in r:
        parts.append(f"rss {r['rss_peak_bytes'] / MiB:.1f} MiB")
    if r.get("over_budget"):
        parts.append("OVER BUDGET" + " (stopped early)" * bool(r.get("stopped_early")) + " OOM" * bool(r.get("oom")))
    if "step_s" in r:
        parts.append(f"step {r['step_s']:.3f} s")
    if "val_bpb" in r:
        parts.append(f"val bpb {r['val_bpb']:.4f} ({r['tokens']} tokens, {r['train_s']:.0f} s)")
    return " ".join(parts) + f" [{r.get('worker_wall_s')} s]"


def base_spec(args: argparse.Namespace, sizes: dict[str, Any], model: str = "revformer", **overrides: Any) -> Spec:
    keys = {f.name for f in dataclasses.fields(Spec)}
    values = {k: v for k, v in sizes.items() if k in keys}
    values.update(device=args.device, dtype=args.dtype, threads=args.threads, model=model, **overrides)
    return Spec(**values)


def suite_depth(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Peak memory (one process per model and depth) and step time (one process per depth) against depth."""
    for depth in sizes["depths"]:
        specs = [base_spec(args, sizes, m, num_layers=depth) for m in args.models]
        for spec in specs:
            runner.memory(spec, "depth")
        if not args.skip_time:
            runner.time(specs, "depth", sizes["steps"])


def suite_core(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Reversible vs plain: activation memory at a few depths, step time at one depth beside Llama +/- ckpt."""
    for depth in sizes["depths"]:
        for model in ("revformer", "revformer_plain"):
            runner.memory(base_spec(args, sizes, model, num_layers=depth), "core")
    models = [m for m in ("revformer", "revformer_plain", "llama_ckpt", "llama") if m in args.models]
    runner.time([base_spec(args, sizes, m, num_layers=sizes["time_depth"]) for m in models], "core", sizes["steps"])


def longest_sequence(runner: Runner, spec: Spec, start: int, max_len: int, budget: int | None,
                     quantum: int = 256, resolution: float = 0.25, suite: str = "length",
                     with_optimizer: bool = True, **tags: Any) -> dict[str, Any]:
    """Longest `seq_len` whose training step fits: double from `start`, then bisect to within `resolution`."""
    probes: dict[int, bool] = {}

    def fits(seq_len: int) -> bool:
        r = runner.memory(spec.replace(seq_len=seq_len), suite, budget, with_optimizer, probe=True, **tags)
        probes[seq_len] = bool(r.get("ok")) and not r.get("over_budget")
        if not r.get("ok") and not r.get("over_budget"):
            raise RuntimeError(f"probe failed: {describe(r)}")
        return probes[seq_len]

    lo, hi, length = 0, None, start
    while length <= max_len:
        if fits(length):
            lo, length = length, length * 2
        else:
            hi = length
            break
    if lo == 0 and hi is not None:  # even `start` does not fit: halve down
        while hi > quantum and not fits(hi // 2):
            hi //= 2
        lo = hi // 2 if hi > quantum else 0
    while hi is not None and lo and hi - lo > max(quantum, resolution * lo):
        mid = (lo + hi) // 2 // quantum * quantum
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return {"mode": "longest", "model": spec.model, "longest": lo, "first_failing": hi, "capped": hi is None,
            "max_len": max_len, "budget_bytes": budget, "probes": sorted(probes.items())}


def suite_length(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Longest trainable sequence per model; every probe doubles as a point of memory against length."""
    gib = args.memory_budget_gib if args.memory_budget_gib is not None else sizes["budget_gib"]
    budget = int(gib * 2**30) if gib else None
    if budget is None and args.device == "cpu":
        raise SystemExit("the length suite on CPU needs --memory-budget-gib")
    for model in args.models:
        spec = base_spec(args, sizes, model)
        try:
            result = longest_sequence(runner, spec, sizes["start"], sizes["max_len"], budget)
        except RuntimeError as exc:
            result = {"mode": "longest", "model": model, "ok": False, "error": str(exc)}
        result.update(suite="length", spec=dataclasses.asdict(spec), device=args.device)
        with open(runner.out / "length.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[length] {model}: longest {result.get('longest')} (first failing {result.get('first_failing')})",
              file=sys.stderr, flush=True)


def suite_longseq(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """revformer's peak memory against length, per attention kind, without and with chunking."""
    for attention in ("full", "local", "lsh"):
        for chunk in (0, sizes["chunk"]):
            for seq_len in sizes["lengths"]:
                if attention == "full" and seq_len > sizes["full_max_len"]:
                    continue
                spec = base_spec(args, sizes, "revformer", attention=attention, chunk=chunk, seq_len=seq_len)
                runner.memory(spec, "longseq")
    print(growth_table(read_records(runner.out / "longseq.jsonl")), file=sys.stderr)


# What a user compares (suite `memory`): revformer as shipped, each memory option alone, and the baselines.
MEMORY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "revformer": ("revformer", {}),  # RevformerConfig defaults
    "revformer_no_chunking": ("revformer", {"chunk": 0}),
    "revformer_ff_chunks_only": ("revformer", {"loss_chunk": 0}),
    "revformer_loss_chunks_only": ("revformer", {"ff_chunk": 0}),
    "llama": ("llama", {}),
    "llama_ckpt": ("llama_ckpt", {}),
    "reformer": ("reformer", {}),
}


def suite_memory(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Peak memory of one forward+backward (no optimizer state to hide activations) against length, and the longest
    sequence whose forward+backward fits a memory budget, for every entry of MEMORY_VARIANTS."""
    variants = [v for v in MEMORY_VARIANTS if MEMORY_VARIANTS[v][0] in args.models]
    for seq_len in sizes["lengths"]:
        for variant in variants:
            model, overrides = MEMORY_VARIANTS[variant]
            if seq_len > sizes["max_len"].get(variant, math.inf):
                continue
            spec = base_spec(args, sizes, model, seq_len=seq_len, **overrides)
            runner.memory(spec, "memory", with_optimizer=False, variant=variant)
    gib = args.memory_budget_gib if args.memory_budget_gib is not None else sizes["budget_gib"]
    budget = int(gib * 2**30) if gib else None
    for variant in [v for v in variants if v in sizes["longest"]]:
        model, overrides = MEMORY_VARIANTS[variant]
        spec = base_spec(args, sizes, model, **overrides)
        try:
            result = longest_sequence(runner, spec, sizes["start"], sizes["longest_max_len"], budget,
                                      suite="memory_probes", with_optimizer=False, variant=variant)
        except RuntimeError as exc:
            result = {"mode": "longest", "model": model, "ok": False, "error": str(exc)}
        result.update(suite="memory", variant=variant, spec=dataclasses.asdict(spec), device=args.device)
        with open(runner.out / "memory.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[memory] {variant}: longest {result.get('longest')} within {gib} GiB", file=sys.stderr, flush=True)


def variant_of(spec: dict[str, Any]) -> str | None:
    """The MEMORY_VARIANTS name of a spec (as stored in the JSON lines), if it is one."""
    for variant, (model, overrides) in MEMORY_VARIANTS.items():
        if spec["model"] == model and all(spec.get(k) == overrides.get(k) for k in ("chunk", "ff_chunk", "loss_chunk")):
            return variant
    return None


def suite_cost(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Training-step time of revformer with its default memory options against none and each option alone; the
    models are stepped round-robin in one process, so their ratios share the machine's noise."""
    variants = ("revformer", "revformer_no_chunking", "revformer_ff_chunks_only", "revformer_loss_chunks_only")
    runner.time([base_spec(args, sizes, MEMORY_VARIANTS[v][0], **MEMORY_VARIANTS[v][1]) for v in variants], "cost",
                sizes["steps"])


def suite_quality(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Same data, same tokens: revformer with `local`, `lsh` and alternating `local`/`lsh` layers (records tagged
    `attention_variant`; same parameters as `full`), then revformer reversible (`full`), plain, and a Llama with the
    same parameter count. Only the models in `--models` run; the attention variants need `revformer`."""

    def train(spec: Spec, **tags: Any) -> None:
        payload = {"mode": "train", "spec": dataclasses.asdict(spec), "steps": sizes["steps"], "lr": sizes["lr"],
                   "eval_every": sizes["eval_every"], "val_blocks": sizes["val_blocks"], "data": args.data}
        runner.launch(payload, "quality", False, **tags)

    if "revformer" in args.models:
        layers = base_spec(args, sizes).num_layers
        mixed = ["local", "lsh"] * (layers // 2) + ["local"] * (layers % 2)  # a list of kinds: one per layer
        for variant, attention in (("local", "local"), ("lsh", "lsh"), ("local/lsh", mixed)):
            train(base_spec(args, sizes, "revformer", attention=attention), attention_variant=variant)
    for model in ("revformer", "revformer_plain", "llama"):
        if model in args.models:
            train(base_spec(args, sizes, model), attention_variant="full")


SUITE_FUNCTIONS = {"depth": suite_depth, "core": suite_core, "length": suite_length, "longseq": suite_longseq,
                   "quality": suite_quality, "memory": suite_memory, "cost": suite_cost}


# ---------------------------------------------------------------------------------------------- parent: report


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MiB:.1f}"


def ok_memory(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("mode") == "memory" and r.get("ok") and not r.get("over_budget")]


def by_model_and(records: list[dict[str, Any]], key: str) -> dict[str, dict[int, dict[str, Any]]]:
    """{model: {spec[key]: record}} (the last record wins)."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        table.setdefault(r["spec"]["model"], {})[r["spec"][key]] = r
    return table


def pivot(rows: list[int], table: dict[str, dict[int, dict[str, Any]]], cell: Callable[[dict[str, Any]], str],
          first: str) -> list[str]:
    models = [m for m in MODELS if m in table]
    lines = [f"| {first} | " + " | ".join(LABELS[m] for m in models) + " |", "|---" * (len(models) + 1) + "|"]
    for row in rows:
        cells = [cell(table[m][row]) if row in table[m] else "–" for m in models]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


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


def evaluate_targets(res: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """(target, figure, met/missed) for every target that has data."""
    out: list[tuple[str, str, str]] = []
    mem = by_model_and(ok_memory(res.get("depth", [])), "num_layers")
    rev = mem.get("revformer", {})
    if len(rev) >= 2:
        lo, hi = min(rev), max(rev)
        d_peak = rev[hi]["peak_bytes"] - rev[lo]["peak_bytes"]
        d_static = rev[hi]["static_bytes"] - rev[lo]["static_bytes"]
        out.append(((f"Activation memory flat in depth: peak({hi} layers) - peak({lo}) <= 1.05 x added "
                    "param+grad+optimizer bytes"),
                    (f"{d_peak / MiB:.1f} MiB vs {d_static / MiB:.1f} MiB added ({d_peak / d_static:.3f}x); "
                    f"activation {mib(rev[lo]['activation_bytes'])} -> {mib(rev[hi]['activation_bytes'])} MiB"),
                    "met" if d_peak <= 1.05 * d_static else "missed"))
    times = {r["spec"]["model"]: r for r in res.get("core", []) if r.get("mode") == "time" and r.get("ok")}
    if "revformer" in times and "revformer_plain" in times:
        ratio = times["revformer"]["step_s"] / times["revformer_plain"]["step_s"]
        depth = times["revformer"]["spec"]["num_layers"]
        out.append((f"Reversible step time <= 1.4x plain ({depth} layers)", f"{ratio:.2f}x",
                    "met" if ratio <= 1.4 else "missed"))
        if "llama_ckpt" in times:
            vs = times["revformer"]["step_s"] / times["llama_ckpt"]["step_s"]
            out.append(("Reversible no slower than checkpointed Llama", f"{vs:.2f}x checkpointed Llama's step time",
                        "met" if vs <= 1.0 else "missed"))
    longest = {r["model"]: r for r in res.get("length", []) if r.get("mode") == "longest" and "longest" in r}
    if "revformer" in longest and "llama" in longest and longest["llama"]["longest"]:
        rev_l, base = longest["revformer"]["longest"], longest["llama"]["longest"]
        capped = " (reached the search cap)" if longest["revformer"].get("capped") else ""
        out.append(("Longest sequence >= 4x non-checkpointed Llama",
                    f"{rev_l} vs {base} tokens ({rev_l / base:.2f}x){capped}",
                    "met" if rev_l >= 4 * base else "missed"))
        if "llama_ckpt" in longest:
            ck = longest["llama_ckpt"]["longest"]
            out.append(("Longest sequence above checkpointed Llama",
                        f"{rev_l} vs {ck} tokens ({rev_l / max(ck, 1):.2f}x)", "met" if rev_l > ck else "missed"))
    growth, longest_at_budget = memory_tables(res.get("memory", []))
    base, rev = growth.get("llama_ckpt", {}), growth.get("revformer", {})
    for length in sorted(set(base) & set(rev)):
        ratio = rev[length] / base[length]
        target = 0.35 if length <= 4096 else None
        out.append((f"Default revformer's forward+backward memory at {length} tokens vs Llama + checkpointing"
                    + (f" <= {target}x" if target else ""),
                    f"{rev[length] / MiB:.0f} vs {base[length] / MiB:.0f} MiB ({ratio:.2f}x)",
                    ("met" if ratio <= target else "missed") if target else "info"))
    if longest_at_budget.get("revformer") and longest_at_budget.get("llama_ckpt"):
        rev_l, ck = longest_at_budget["revformer"]["longest"], longest_at_budget["llama_ckpt"]["longest"]
        out.append(("Longest forward+backward at equal budget >= 4x Llama + checkpointing (default revformer)",
                    f"{rev_l} vs {ck} tokens ({rev_l / max(ck, 1):.2f}x)", "met" if rev_l >= 4 * ck else "missed"))
    cost = {variant_of(r["spec"]): r for r in res.get("cost", []) if r.get("mode") == "time" and r.get("ok")}
    if "revformer" in cost and "revformer_no_chunking" in cost:
        ratio = cost["revformer"]["step_s"] / cost["revformer_no_chunking"]["step_s"]
        s = cost["revformer"]["spec"]
        out.append((f"Default memory options cost <= 3% of a training step ({s['num_layers']} layers, "
                    f"d={s['hidden_size']}, T={s['seq_len']})",
                    f"{cost['revformer']['step_s']:.2f} s vs {cost['revformer_no_chunking']['step_s']:.2f} s "
                    f"({ratio - 1:+.1%})", "met" if ratio <= 1.03 else "missed"))
    bpb = {r["spec"]["model"]: r["val_bpb"] for r in res.get("quality", []) if r.get("mode") == "train" and r.get("ok")}
    for other in ("revformer_plain", "llama"):
        if "revformer" in bpb and other in bpb:
            rel = bpb["revformer"] / bpb[other] - 1
            out.append((f"Validation bpb within 2% of {LABELS[other]} (equal params and tokens)",
                        f"{bpb['revformer']:.4f} vs {bpb[other]:.4f} ({rel:+.2%}; lower is better)",
                        "met" if abs(rel) <= 0.02 else "missed"))
    return out


MEMORY_LABELS = {
    "revformer": "revformer, default config", "revformer_no_chunking": "revformer, no chunking",
    "revformer_ff_chunks_only": "revformer, FF chunks only", "revformer_loss_chunks_only": "revformer, loss chunks only",
    "llama": "Llama", "llama_ckpt": "Llama + checkpointing", "reformer": "HF Reformer (local, FF chunks)",
}


def memory_tables(records: list[dict[str, Any]]) -> tuple[dict[str, dict[int, int]], dict[str, dict[str, Any]]]:
    """From the memory suite: {variant: {length: growth bytes of one forward+backward}} and {variant: longest}."""
    growth: dict[str, dict[int, int]] = {}
    for r in ok_memory(records):
        growth.setdefault(variant_of(r["spec"]), {})[r["spec"]["seq_len"]] = r["growth_bytes"]
    longest = {r["variant"]: r for r in records if r.get("mode") == "longest" and "longest" in r}
    return growth, longest


def memory_markdown(records: list[dict[str, Any]]) -> list[str]:
    growth, longest = memory_tables(records)
    if not growth:
        return []
    s = ok_memory(records)[0]["spec"]
    lengths = sorted({t for rows in growth.values() for t in rows})
    base = growth.get("llama_ckpt", {})
    lines = [(f"## What a user compares: memory of one forward+backward (d={s['hidden_size']}, {s['num_layers']} "
              f"layers, vocabulary {s['vocab_size']}, batch {s['batch_size']})"), "",
             ("Growth of peak memory during one forward+backward from zeroed gradients (activations + gradients; no "
              "optimizer state), MiB, and its ratio to Llama + checkpointing. `-`: not run (too slow here)."), "",
             "| model | " + " | ".join(f"{t // 1024}K" for t in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for variant in MEMORY_VARIANTS:
        rows = growth.get(variant)
        if rows:
            cells = [(f"{rows[t] / MiB:.0f}" + (f" ({rows[t] / base[t]:.2f}x)" if t in base else "")) if t in rows
                     else "-" for t in lengths]
            lines.append(f"| {MEMORY_LABELS[variant]} | " + " | ".join(cells) + " |")
    if longest:
        budget = next(iter(longest.values())).get("budget_bytes")
        ck = longest.get("llama_ckpt", {}).get("longest")
        lines += ["", f"Longest sequence whose forward+backward fits {budget / 2**30:g} GiB (doubling, then bisection):",
                  "", "| model | longest | vs Llama + checkpointing |", "|---|---|---|"]
        for variant, r in longest.items():
            cap = " (search cap)" if r.get("capped") else ""
            rel = f"{r['longest'] / ck:.2f}x" if ck else "-"
            lines.append(f"| {MEMORY_LABELS[variant]} | {r['longest']}{cap} | {rel} |")
    return lines + [""]


def render_markdown(out: Path, res: dict[str, list[dict[str, Any]]]) -> str:
    env = next((r for rs in res.values() for r in rs if "torch" in r), {})
    lines = [f"# revformer benchmarks: {out.name}", "",
             (f"Device `{env.get('gpu') or env.get('cpu', '?')}` ({env.get('cpu_count')} cores, torch threads "
              f"{env.get('threads')}), torch {env.get('torch')}, transformers {env.get('transformers')}. "
              "One training step = forward, backward, fused AdamW step, batch 1, fp32 unless stated. Every memory "
              "figure comes from a fresh process. Peak = MemTracker peak tensor memory on CPU (peak RSS for HF "
              "Reformer, where MemTracker does not work: approximate), `max_memory_allocated` on CUDA; activation = "
              "peak - (parameters + gradients + optimizer state). Step times: median after one warm-up step; the "
              "models of one table are timed round-robin in one process, so compare ratios within a table. "
              "Raw data: `*.jsonl`; re-render with `python scripts/benchmark.py report`."), ""]
    runs = [r for rs in res.values() for r in rs if r.get("mode") == "suite"]
    if runs:
        walls = ", ".join(f"{r['suite']} {r['wall_s']} s" for r in runs)
        commands = sorted({"python scripts/benchmark.py " + " ".join(r["argv"]) for r in runs})
        total = sum(r["wall_s"] for r in runs)
        lines += [f"Produced by `{'`, `'.join(commands)}`; wall time per suite: {walls} (total {total} s).", ""]
    targets = evaluate_targets(res)
    if targets:
        lines += ["## Targets", "", "| target | figure | status |", "|---|---|---|"]
        lines += [f"| {t} | {f} | **{s}** |" for t, f, s in targets] + [""]
    depth = ok_memory(res.get("depth", []))
    if depth:
        s = depth[0]["spec"]
        table = by_model_and(depth, "num_layers")
        rows = sorted({r["spec"]["num_layers"] for r in depth})
        lines += [f"## Depth sweep (d={s['hidden_size']}, T={s['seq_len']}, {s['num_heads']} heads)", "",
                  "Peak / activation memory (MiB):", ""]
        lines += pivot(rows, table, lambda r: f"{mib(r['peak_bytes'])} / {mib(r['activation_bytes'])}", "layers")
        timed = by_model_and([r for r in res["depth"] if r.get("mode") == "time" and r.get("ok")], "num_layers")
        if timed:
            lines += ["", "Step time (s, median):", ""]
            lines += pivot(rows, timed, lambda r: f"{r['step_s']:.3f}", "layers")
        lines.append("")
    core = res.get("core", [])
    core_mem = by_model_and(ok_memory(core), "num_layers")
    core_time = [r for r in core if r.get("mode") == "time" and r.get("ok")]
    if core_mem or core_time:
        s = (ok_memory(core) or core_time)[0]["spec"]
        lines += [f"## Core: reversible vs plain (d={s['hidden_size']}, T={s['seq_len']})", ""]
        if core_mem:
            rows = sorted({d for t in core_mem.values() for d in t})
            lines += ["Activation memory (MiB):", ""]
            lines += pivot(rows, core_mem, lambda r: mib(r["activation_bytes"]), "layers") + [""]
        if core_time:
            plain = next((r["step_s"] for r in core_time if r["spec"]["model"] == "revformer_plain"), None)
            lines += [(f"Step time at {core_time[0]['spec']['num_layers']} layers (median of "
                      f"{len(core_time[0]['step_times_s'])} steps, models interleaved in one process):"), "",
                      "| model | step (s) | vs plain | tokens/s |", "|---|---|---|---|"]
            for r in core_time:
                rel = f"{r['step_s'] / plain:.2f}x" if plain else "–"
                lines.append(f"| {LABELS[r['spec']['model']]} | {r['step_s']:.3f} | {rel} | {r['tokens_per_s']:.0f} |")
            lines.append("")
    longest = [r for r in res.get("length", []) if r.get("mode") == "longest"]
    if longest:
        s = longest[0]["spec"]
        budget = longest[0].get("budget_bytes")
        lines += [(f"## Longest trainable sequence (d={s['hidden_size']}, {s['num_layers']} layers, "
                  f"{'budget ' + f'{budget / 2**30:g} GiB of peak RSS' if budget else 'until CUDA OOM'})"), "",
                  "| model | longest | first failing | vs Llama | probes (length: fits) |", "|---|---|---|---|---|"]
        base = next((r.get("longest") for r in longest if r["model"] == "llama"), None)
        for r in longest:
            if "longest" not in r:
                lines.append(f"| {LABELS[r['model']]} | error | | | {r.get('error', '')[:80]} |")
                continue
            rel = f"{r['longest'] / base:.2f}x" if base else "–"
            probes = ", ".join(f"{t}:{'y' if ok else 'n'}" for t, ok in r["probes"])
            first = "> cap" if r["capped"] else r["first_failing"]
            lines.append(f"| {LABELS[r['model']]} | {r['longest']} | {first} | {rel} | {probes} |")
        lines.append("")
    longseq = [r for r in res.get("longseq", []) if "spec" in r]  # not the suite's summary line
    if longseq:
        s = longseq[0]["spec"]
        lines += [(f"## Long sequences: revformer peak memory (MiB) by attention kind (d={s['hidden_size']}, "
                  f"{s['num_layers']} layers, chunk length {s['attn_chunk']})"), "",
                  "Growth per doubling = activation(2T) / activation(T); linear when <= 2.2.", "",
                  growth_table(res["longseq"]), ""]
    lines += memory_markdown(res.get("memory", []))
    cost = [r for r in res.get("cost", []) if r.get("mode") == "time" and r.get("ok")]
    if cost:
        s = cost[0]["spec"]
        base = next((r["step_s"] for r in cost if variant_of(r["spec"]) == "revformer_no_chunking"), None)
        lines += [(f"## Cost of the memory options (training step, {s['num_layers']} layers, d={s['hidden_size']}, "
                   f"T={s['seq_len']}, vocabulary {s['vocab_size']}; median of {len(cost[0]['step_times_s'])} steps, "
                   "interleaved)"), "", "| configuration | step (s) | vs no chunking |", "|---|---|---|"]
        for r in cost:
            rel = f"{r['step_s'] / base - 1:+.1%}" if base else "-"
            lines.append(f"| {MEMORY_LABELS[variant_of(r['spec'])]} | {r['step_s']:.3f} | {rel} |")
        lines.append("")
    quality = [r for r in res.get("quality", []) if r.get("mode") == "train" and r.get("ok")]
    if quality:
        s = quality[0]["spec"]
        lines += [(f"## Quality at equal parameters and tokens (d={s['hidden_size']}, {s['num_layers']} layers, "
                  f"T={s['seq_len']}, batch {s['batch_size']}; data: {quality[0]['data']})"), "",
                  "| model | params | tokens | final train loss | val bpb |", "|---|---|---|---|---|"]
        for r in quality:
            tail = r["train_losses"][-20:]
            lines.append(f"| {LABELS[r['spec']['model']]} | {r['params']:,} | {r['tokens']:,} | "
                         f"{sum(tail) / len(tail):.4f} | {r['val_bpb']:.4f} |")
        lines.append("")
    failed = [r for rs in res.values() for r in rs if r.get("mode") != "longest" and not r.get("ok")
              and not r.get("over_budget")]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {describe(r)}" for r in failed] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in sorted(out.glob("*.png"))] + [""]
    return "\n".join(lines)


def render_plots(out: Path, res: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def style(model: str) -> dict[str, Any]:
        color, marker, line = STYLES[model]
        return {"color": color, "marker": marker, "linestyle": line, "label": LABELS[model], "markerfacecolor": "none"}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    depth = by_model_and(ok_memory(res.get("depth", [])), "num_layers")
    if depth:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for model, rows in depth.items():
            xs = sorted(rows)
            axes[0].plot(xs, [rows[x]["peak_bytes"] / MiB for x in xs], **style(model))
            axes[1].plot(xs, [rows[x]["activation_bytes"] / MiB for x in xs], **style(model))
        for ax, title in zip(axes, ("peak memory", "activation memory (peak - params, grads, AdamW state)")):
            ax.set(xlabel="layers", ylabel="MiB", title=title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        save(fig, "memory_vs_depth.png")
    timed = by_model_and([r for r in res.get("depth", []) if r.get("mode") == "time" and r.get("ok")], "num_layers")
    if timed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, rows in timed.items():
            xs = sorted(rows)
            ax.plot(xs, [rows[x]["step_s"] for x in xs], **style(model))
        ax.set(xlabel="layers", ylabel="seconds per training step (median)", title="step time vs depth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "step_time_vs_depth.png")
    probes = [r for r in res.get("length", []) if r.get("mode") == "memory" and "peak_bytes" in r]
    if probes:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for model, rows in by_model_and(probes, "seq_len").items():
            fit = sorted(x for x in rows if not rows[x].get("over_budget"))
            ax.plot(fit, [rows[x]["peak_bytes"] / MiB for x in fit], **style(model))
            over = sorted(x for x in rows if rows[x].get("over_budget"))  # stopped early: memory when stopped
            ax.plot(over, [rows[x]["peak_bytes"] / MiB for x in over], "x", color=STYLES[model][0])
        budget = next((r.get("budget_bytes") for r in probes if r.get("budget_bytes")), None)
        if budget:
            ax.axhline(budget / MiB, color="grey", ls="--", label="budget")
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="peak MiB (x: over budget, stopped)",
               title="memory vs length (one training step)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        save(fig, "memory_vs_length.png")
    longseq = [r for r in res.get("longseq", []) if r.get("mode") == "memory" and r.get("ok")]
    if longseq:
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
        save(fig, "longseq_memory_vs_length.png")
    growth, longest = memory_tables(res.get("memory", []))
    if growth:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
        for i, (variant, rows) in enumerate((v, growth[v]) for v in MEMORY_VARIANTS if v in growth):
            xs = sorted(rows)
            axes[0].plot(xs, [rows[x] / MiB for x in xs], marker="os^v<>D"[i % 7], color=f"C{i}",
                         linestyle="-" if variant.startswith("revformer") else "--", label=MEMORY_LABELS[variant])
        budget = next((r.get("budget_bytes") for r in longest.values() if r.get("budget_bytes")), None)
        if budget:
            axes[0].axhline(budget / MiB, color="grey", ls=":", label="budget of the right panel")
        axes[0].set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="MiB",
                    title="memory of one forward+backward")
        axes[0].grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=7)
        if longest:
            names = [v for v in MEMORY_VARIANTS if v in longest]
            axes[1].barh([MEMORY_LABELS[v] for v in names], [longest[v]["longest"] for v in names],
                         color=[f"C{list(MEMORY_VARIANTS).index(v)}" for v in names])
            axes[1].invert_yaxis()
            axes[1].tick_params(axis="y", labelsize=7)
            axes[1].set(xlabel="tokens", title=f"longest sequence within {budget / 2**30:g} GiB" if budget else
                        "longest sequence")
            axes[1].grid(alpha=0.3, axis="x")
        save(fig, "memory_forward_backward.png")
    quality = [r for r in res.get("quality", []) if r.get("mode") == "train" and r.get("ok")]
    if quality:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in quality:
            tokens_per_step = r["spec"]["batch_size"] * r["spec"]["seq_len"]
            losses = r["train_losses"]
            k = max(1, len(losses) // 40)
            windows = [losses[max(0, i - k + 1) : i + 1] for i in range(len(losses))]
            kw = style(r["spec"]["model"])
            axes[0].plot([(i + 1) * tokens_per_step for i in range(len(losses))], [sum(w) / len(w) for w in windows],
                         **{**kw, "marker": None})
            curve = r["val_bpb_curve"]
            axes[1].plot([s * tokens_per_step for s, _ in curve], [b for _, b in curve], **kw)
        axes[0].set(xlabel="training tokens", ylabel="train loss (nats/token, smoothed)", title="training loss")
        axes[1].set(xlabel="training tokens", ylabel="bits per byte", title="validation bpb (subset)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "loss_curves.png")


def report(out: Path) -> str:
    res = {suite: read_records(out / f"{suite}.jsonl") for suite in SUITES}
    render_plots(out, res)
    text = render_markdown(out, res)
    (out / "README.md").write_text(text)
    return text


# ------------------------------------------------------------------------------------------------------- CLI


def device_tag(device: str) -> str:
    """Results folder name: `cpu`, or `cuda-<gpu name>`."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="run", choices=("run", "report"),
                   help="run suites (default) or re-render plots and Markdown from existing JSON lines")
    p.add_argument("--suite", default="all", help=f"comma-separated subset of {','.join(SUITES)}, or all")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast (fp32 master weights)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads in every worker (1: robust when other jobs share the cores)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models for depth/length suites")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="length suite budget (CPU default 0.125)")
    p.add_argument("--data", default="auto", choices=("auto", "project", "builtin"), help="quality suite data")
    p.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds before a worker is abandoned")
    p.add_argument("--skip-time", action="store_true", help="depth suite: memory only")
    p.add_argument("--no-report", action="store_true", help="write JSON lines only (no plots/Markdown)")
    p.add_argument("--set", action="append", default=[], metavar="SUITE.KEY=VALUE",
                   help="override a suite size, e.g. depth.depths=[2,8] or length.max_len=8192 (JSON values)")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    if argv[:1] == ["_worker"]:
        worker_main(json.loads(argv[1]))
        return
    args = parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    out = args.out or REPO / "benchmarks" / "results" / device_tag(args.device)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "report":
        print(report(out))
        return
    suites = list(SUITES) if args.suite == "all" else args.suite.split(",")
    defaults = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    sizes = {s: dict(getattr(defaults, s)) for s in SUITES}
    for item in args.set:
        key, value = item.split("=", 1)
        suite, name = key.split(".", 1)
        sizes[suite][name] = json.loads(value)
    runner = Runner(out, args.worker_timeout)
    start = time.perf_counter()
    for suite in suites:
        if suite not in SUITE_FUNCTIONS:
            raise SystemExit(f"unknown suite {suite!r}; choose from {SUITES}")
        path = out / f"{suite}.jsonl"
        path.unlink(missing_ok=True)
        t = time.perf_counter()
        SUITE_FUNCTIONS[suite](runner, args, sizes[suite])
        wall = time.perf_counter() - t
        with open(path, "a") as f:  # provenance: the command and how long the suite took
            f.write(json.dumps({"mode": "suite", "suite": suite, "wall_s": round(wall), "argv": argv,
                                "sizes": sizes[suite], "device": args.device, "ok": True}) + "\n")
        print(f"== suite {suite} done in {wall:.0f} s", file=sys.stderr, flush=True)
    print(f"== all done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not args.no_report:
        print(report(out))


if __name__ == "__main__":
    main(sys.argv[1:])
