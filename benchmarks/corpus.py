"""The quality benchmarks' data and score: revformer.data's byte-level stdlib corpus, validation bits per byte, and
the training worker that reports both.

The corpus is the project's own pipeline (`revformer.data`: stdlib sources, byte tokenizer, packed blocks, files
held out by hash), and bits per byte is `revformer.data.bits_per_byte`. The summed cross-entropy is taken from the
batch-mean loss of each batch of blocks rather than from `revformer.trainer.evaluate`, which restarts positions at
every document (data.document_attention) and would change the figures already recorded.

Training follows revformer.trainer's learning-rate schedule (`lr_lambda`: linear warm-up over 5% of the steps, at
least one, then cosine decay to 10%) with AdamW (0.9, 0.95), weight decay 0.1 and gradients clipped at norm 1.0, one
batch of blocks per step. The optimizer is the benchmarks' own (`models.make_optimizer`): it decays every parameter
and is fused, as when the recorded figures were measured, where `revformer.trainer.build_optimizer` exempts norms,
biases and embeddings from weight decay and uses torch's default (unfused) AdamW.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .env import environment
from .models import Spec, autocast, build_model, make_optimizer, param_stats, train_step
from .probes import setup_worker
from .runner import emit

DATA_SOURCES = ("auto", "project")  # `--data`: both are revformer.data (`auto` kept for existing commands)


@dataclass
class Corpus:
    """Training and validation blocks of `seq_len` tokens, and the UTF-8 bytes each validation block predicts."""

    source: str
    vocab_size: int
    train: Callable[[int, int], Any]  # (step, batch) -> (batch, seq_len) int64 tensor, deterministic
    val: Any  # (num_blocks, seq_len) int64 tensor
    val_bytes: list[int]


def project_corpus(seq_len: int, seed: int, val_blocks: int) -> Corpus:
    """The project's data pipeline (revformer.data): stdlib corpus, byte tokenizer, packed blocks; `val_blocks`
    evenly spaced validation blocks, training batches drawn by (seed, step)."""
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
    """The corpus named by `--data` (see DATA_SOURCES)."""
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose from {DATA_SOURCES}")
    return project_corpus(seq_len, seed, val_blocks)


def evaluate_bpb(model: Any, corpus: Corpus, spec: Spec, blocks: int | None = None, batch: int = 16) -> float:
    """Validation bits per byte: summed next-token cross-entropy (nats) / (ln 2 * UTF-8 bytes predicted)."""
    import torch

    from revformer.data import bits_per_byte

    val = corpus.val[:blocks] if blocks else corpus.val
    n_bytes = sum(corpus.val_bytes[: len(val)])
    nats = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(val), batch):
            ids = val[i : i + batch].to(spec.device)
            with autocast(spec.device, spec.dtype):
                loss = model(input_ids=ids, labels=ids).loss  # mean over the (T - 1) predicted tokens per row
            nats += float(loss) * ids.shape[0] * (ids.shape[1] - 1)
    model.train()
    return bits_per_byte(nats, n_bytes)


def reconstruction_error(model: Any, corpus: Corpus, spec: Spec) -> float | None:
    """max |x - x'| of the trained reversible model on 8 validation blocks (None for other models); in evaluation
    mode where its coupling is invertible there, else (bdia) in training mode."""
    if not spec.model.startswith("revformer") or not model.config.reversible:
        return None
    model.train(not model.model.coupling.invertible(False))
    with autocast(spec.device, spec.dtype):
        error = model.model.reconstruction_error(corpus.val[:8].to(spec.device))
    model.train()
    return error


def training_run(steps: int, lr: float) -> Any:
    """The trainer's run configuration of one training worker: `steps` optimizer steps at peak learning rate `lr`,
    5% warm-up (at least one step), cosine decay to 10%, AdamW (0.9, 0.95), weight decay 0.1, clipping at 1.0."""
    from revformer.config import DataConfig, RunConfig, TrainConfig

    train = TrainConfig(max_steps=steps, learning_rate=lr, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1,
                        weight_decay=0.1, adam_betas=[0.9, 0.95], max_grad_norm=1.0)
    return RunConfig(model={}, data=DataConfig(), train=train)


def train_worker(spec: Spec, steps: int, lr: float, eval_every: int, val_blocks: int, data: str,
                 curve_blocks: int = 32, stop_after: int | None = None) -> None:
    """Train `spec.model` for `steps` steps on the stdlib bytes and report loss curves and validation bpb (the
    curve on `curve_blocks` validation blocks, the end on all `val_blocks`), and for the reversible model the
    reconstruction error of its trained weights. `stop_after` ends the run early on the same `steps`-long
    schedule, so its curve is comparable point by point with a full run's."""
    import torch

    from revformer.trainer import lr_lambda

    setup_worker(spec)
    corpus = load_corpus(data, spec.seq_len, spec.seed, val_blocks)
    spec = spec.replace(vocab_size=corpus.vocab_size)
    model = build_model(spec)
    run = training_run(steps, lr)
    optimizer = make_optimizer(model, run.train.learning_rate, run.train.weight_decay, tuple(run.train.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run))
    curve_blocks = min(curve_blocks, len(corpus.val))
    losses, val_curve = [], []
    start = time.perf_counter()
    for step in range(stop_after or steps):
        ids = corpus.train(step, spec.batch_size).to(spec.device)
        losses.append(train_step(model, optimizer, ids, spec.device, spec.dtype, clip=run.train.max_grad_norm))
        scheduler.step()
        if (step + 1) % eval_every == 0 or step + 1 == (stop_after or steps):
            val_curve.append([step + 1, evaluate_bpb(model, corpus, spec, curve_blocks)])
    train_s = time.perf_counter() - start
    emit({"mode": "train", "spec": dataclasses.asdict(spec), **environment(spec.device, spec.threads),
          **param_stats(model), "ok": True, "data": corpus.source, "steps": steps, "lr": lr,
          "stopped_at": stop_after or steps, "tokens": (stop_after or steps) * spec.batch_size * spec.seq_len,
          "train_s": train_s, "train_losses": losses,
          "val_bpb_curve": val_curve, "val_curve_blocks": curve_blocks, "val_blocks": len(corpus.val),
          "val_bytes": sum(corpus.val_bytes), "val_bpb": evaluate_bpb(model, corpus, spec),
          "reconstruction_error": reconstruction_error(model, corpus, spec)})


def train_main(payload: dict[str, Any]) -> None:
    """Worker mode `train`."""
    train_worker(Spec(**payload["spec"]), payload["steps"], payload["lr"], payload["eval_every"],
                 payload["val_blocks"], payload["data"], payload.get("curve_blocks", 32), payload.get("stop_after"))
