"""The training loop over Accelerate, from one CPU process to many GPUs (DDP or FSDP2).

`train()` is `setup()` (everything before the first step), one straight loop of `train_step()` with explicit
periodic blocks (log, evaluate, checkpoint), and `finish()` (final evaluation of the whole validation split, the
model folder, the Hub). Distribution, mixed precision, gradient accumulation, tracking and checkpoints live here;
the model is single-device code. A run is resumable exactly: model, optimizer, scheduler, RNG and data position
(in any epoch, streamed or not). A non-finite loss or gradient stops the run before the update is applied, and
only finite states are ever checkpointed. SIGTERM or SIGINT (a preemption) checkpoints at the next step and stops; a
tracker whose service process the preemption stopped too is dropped with a one-line warning, never ending the run.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    set_seed,
)
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from .config import ConfigError, RunConfig, save_run_config
from .configuration_revformer import RevformerConfig
from .data import (
    DataError,
    bits_per_byte,
    build_dataloader,
    check_block_size,
    document_position_ids,
    prepare_datasets,
)
from .export import ExportError, check_exportable, export_family, export_model
from .loss import Teacher
from .modeling_revformer import RevformerForCausalLM
from .sequence_parallel import SequenceParallel, build_mesh, sequence_parallel_off, set_sequence_parallel
from .tokenizer import get_tokenizer, load_tokenizer

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "model"
EXPORT_DIR = "export"  # train.export_source: the final model as its standard architecture
STATE_FILE = "trainer_state.json"
GLOO_SETTLE_S = 1.0  # seconds a gloo (CPU) process group's worker threads get to go idle before teardown


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN/inf loss, gradients or parameters); the message names the last finite checkpoint."""


class NonFiniteError(Exception):
    """Raised inside the loop where a non-finite value is found; `train` turns it into NonFiniteLossError."""

    def __init__(self, what: str, step: int) -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.what, self.step = what, step


# ----------------------------------------------------------------------------- setup


def build_tokenizer(run: RunConfig, accelerator: Accelerator) -> PreTrainedTokenizerBase:
    """The run's tokenizer: the fine-tuned model's own, or the one `data.tokenizer` names (trained once, cached)."""
    if run.train.init_from:
        return load_tokenizer(run.train.init_from)
    with accelerator.main_process_first():  # rank 0 trains a BPE; the others load its cached files
        return get_tokenizer(run.data)


def build_model(run: RunConfig, tokenizer: PreTrainedTokenizerBase) -> RevformerForCausalLM:
    """A fresh model sized to the tokenizer, or (fine-tuning) `train.init_from` with the model section as overrides."""
    if run.train.init_from:
        model = AutoModelForCausalLM.from_pretrained(run.train.init_from, **run.model)
    else:
        config = run.model_config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = RevformerForCausalLM(config)
    check_block_size(run.data.block_size, model.config.max_position_embeddings)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"The tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}; "
            "fine-tune with the tokenizer saved beside the model."
        )
    return model


def build_teacher(run: RunConfig, model: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
    """The frozen `train.distill_from` model on `device` (None without distillation), checked against the student."""
    if not run.train.distill_from:
        return None
    if not isinstance(model, RevformerForCausalLM):  # only revformer's loss takes the teacher's targets
        raise ConfigError(f"train.distill_from needs a revformer student; train.init_from={run.train.init_from} is a "
                          f"{type(model).__name__}. Convert it first (scripts/convert.py).")
    try:
        teacher = AutoModelForCausalLM.from_pretrained(run.train.distill_from)
    except (OSError, ValueError) as err:
        raise ConfigError(f"train.distill_from={run.train.distill_from}: cannot load a causal LM from it ({err}); "
                          "give a Hub id or a save_pretrained folder.") from err
    head = teacher.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or getattr(
        teacher.config, "final_logit_softcapping", None
    ):
        raise ConfigError(f"train.distill_from={run.train.distill_from}: its logits are not a plain linear head of "
                          "its final hidden states, which chunked distillation needs.")
    if head.weight.shape[0] != model.config.vocab_size:
        raise ConfigError(f"train.distill_from={run.train.distill_from} has a vocabulary of {head.weight.shape[0]} "
                          f"tokens, the model {model.config.vocab_size}: distillation needs the same tokenizer.")
    return teacher.requires_grad_(False).eval().to(device)


@torch.no_grad()
def teacher_targets(teacher: torch.nn.Module, ids: torch.Tensor, position_ids: torch.Tensor | None,
                    ce_weight: float) -> dict[str, Teacher]:
    """The forward keyword that makes the model's loss the distillation loss: a `Teacher` of the teacher's final
    hidden states (its logits are computed chunk by chunk inside the loss, never for the whole batch) and LM-head
    weight."""
    # use_cache=False: transformers' models build a cache by default, and then ignore documents marked by position_ids
    hidden = teacher.base_model(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
    return {"teacher": Teacher(hidden, teacher.get_output_embeddings().weight, ce_weight)}


def build_optimizer(model: torch.nn.Module, run: RunConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: norms, biases and embeddings are not decayed."""
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 or "embed" in name or "norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": run.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=run.train.learning_rate, betas=tuple(run.train.adam_betas))


def lr_lambda(run: RunConfig):
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio` of it at `max_steps`."""
    warmup, total, floor = run.train.warmup_steps, run.train.max_steps, run.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def configure_tracking(run: RunConfig) -> str | None:
    """accelerate's `log_with`; wandb goes offline when no API key is configured, so tracking always works."""
    if run.train.report_to == "none":
        return None
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
    if not has_key:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    return "wandb"


def log_metrics(accelerator: Accelerator, values: dict[str, Any], step: int) -> None:
    """`accelerator.log`, except that trackers whose service process is gone are dropped instead of ending the run.

    A scheduler that preempts a job sends SIGTERM to all of its processes, wandb's service among them, while the
    trainer still has to reach the next step and checkpoint. accelerate logs to all trackers in one call, so a lost
    connection drops them all (a run has at most one: wandb).
    """
    try:
        accelerator.log(values, step=step)
    except ConnectionError as err:
        for tracker in list(accelerator.trackers):
            drop_lost_tracker(accelerator, tracker, err)


def end_training(accelerator: Accelerator) -> None:
    """`accelerator.end_training()` (finish the trackers, then tear the process group down), where a tracker whose
    service process is gone is dropped with a one-line warning rather than a traceback."""
    for tracker in list(accelerator.trackers):
        try:
            tracker.finish()
        except ConnectionError as err:
            drop_lost_tracker(accelerator, tracker, err)
    accelerator.trackers.clear()  # each is finished or dropped; what remains of end_training is the teardown
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if accelerator.num_processes > 1 and distributed and "gloo" in str(torch.distributed.get_backend()):
        # A gloo worker thread frees a finished collective's tensors just after the op returns, and needs the GIL for
        # it. The process group's destructor (run when the last holder, e.g. the DDP model, is released) holds the GIL
        # while it joins those threads, so a worker still freeing then deadlocks the rank; at interpreter exit it
        # aborts it (SIGABRT). Sleeping releases the GIL: the workers finish while nothing waits on them.
        time.sleep(GLOO_SETTLE_S)
    accelerator.end_training()


def drop_lost_tracker(accelerator: Accelerator, tracker: Any, err: ConnectionError) -> None:
    """Forget a tracker that lost its service process, saying so in one line.

    For wandb this also releases the service connection, whose exit-time teardown would otherwise print a
    traceback of the same lost connection. What the service wrote before it ended stays where it is.
    """
    accelerator.trackers.remove(tracker)
    print(f"warning: the {tracker.name} tracker lost its service process ({type(err).__name__}: {err}); it is "
          "closed, and nothing more is logged to it.", file=sys.stderr)
    if tracker.name == "wandb":
        import wandb

        try:
            wandb.teardown()
        except ConnectionError:
            pass  # the same lost connection; wandb has unhooked its exit-time teardown before it raised


def launched_on_cpu_processes() -> bool:
    """Several processes (`accelerate launch` / torchrun set WORLD_SIZE) on a machine without CUDA."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Hand the CPU process group the FSDP plugin that the launch config describes.

    accelerate turns its FSDP plugin on only for accelerator devices, but FSDP2 (`fully_shard`) runs on CPU over
    gloo: this is how sharded training is exercised for real on machines without GPUs (the tests do). On GPUs
    accelerate sets everything up itself and this is not called.
    """
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` exported
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # Both state singletons: accelerate re-syncs AcceleratorState from PartialState while preparing the model.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


# ----------------------------------------------------------------------------- data position


class TrainBatches:
    """Global micro-batches forever, epoch after epoch, from a position (epoch, batches already read in it).

    The order of each epoch is a pure function of (seed, epoch), so a resumed run sees exactly the batches an
    uninterrupted run would have seen next. A streamed dataset's epoch length is unknown until it ends, so the
    position is what checkpoints record: resuming works in any epoch, and a resume that lands exactly at the end
    of an epoch starts the next one. Under sequence parallelism (`sp`) the batch is split between the data-parallel
    ranks only: every rank of an sp group reads the same sequences (and `train_step` takes its slice).
    """

    def __init__(self, blocks: Any, run: RunConfig, accelerator: Accelerator, epoch: int = 0, index: int = 0,
                 sp: SequenceParallel | None = None) -> None:
        self.blocks, self.run, self.accelerator, self.sp = blocks, run, accelerator, sp
        self.epoch, self.index = epoch, index
        if hasattr(blocks, "__len__") and len(blocks) // run.train.batch_size == 0:
            raise ConfigError(
                f"The training split has {len(blocks)} blocks, fewer than one batch of {run.train.batch_size}; "
                "lower train.batch_size or data.block_size, or use more data."
            )
        self._batches = self._generate()

    def _generate(self) -> Iterator[dict[str, torch.Tensor]]:
        batch_size = self.run.train.batch_size
        while True:
            if hasattr(self.blocks, "__len__") and self.index >= len(self.blocks) // batch_size:
                self.epoch, self.index = self.epoch + 1, 0
            loader = build_dataloader(self.blocks, batch_size, seed=self.run.train.seed, epoch=self.epoch,
                                      skip_batches=self.index)
            produced = False
            for batch in self._shard(loader):
                produced = True
                self.index += 1
                yield batch
            if not produced and self.index == 0:
                raise DataError("The training split produced no batch of train.batch_size blocks; use more data.")
            self.epoch, self.index = self.epoch + 1, 0

    def _shard(self, loader: Any) -> Any:
        """This process's part of each global batch: its dp rank's (rank // sp_size) under sequence parallelism."""
        if self.sp is None:
            return self.accelerator.prepare_data_loader(loader, device_placement=True)
        from accelerate.data_loader import prepare_data_loader

        acc, size = self.accelerator, self.sp.size
        return prepare_data_loader(loader, acc.device, num_processes=acc.num_processes // size,
                                   process_index=acc.process_index // size, split_batches=True, put_on_device=True,
                                   rng_types=acc.rng_types.copy(), dispatch_batches=False)

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self._batches)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.index}


def sample_blocks(blocks: Any, count: int, seed: int = 0) -> Any:
    """A fixed random sample of `count` blocks (the first `count` of a stream), in their original order."""
    if not hasattr(blocks, "__len__"):
        return blocks.take(count)
    if count >= len(blocks):
        return blocks
    chosen = np.random.default_rng(seed).choice(len(blocks), size=count, replace=False)
    return blocks.select(np.sort(chosen))


def block_position_ids(model: torch.nn.Module, ids: torch.Tensor, document_attention: bool) -> torch.Tensor | None:
    """position_ids restarting at each document of the packed blocks (data.document_attention), else None."""
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if not document_attention or not isinstance(eos, int):
        return None
    return document_position_ids(ids, eos)


def sequence_nats(
    model: torch.nn.Module, ids: torch.Tensor, chunked_loss: bool, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of each sequence in `ids`, as float64, shape (B,)."""
    if chunked_loss:
        # One block at a time through the chunked loss: full-sequence logits are what chunking avoids.
        rows = position_ids.split(1) if position_ids is not None else [None] * ids.shape[0]
        return torch.stack([model(input_ids=row, labels=row, position_ids=pos).loss.double() * (ids.shape[1] - 1)
                            for row, pos in zip(ids.split(1), rows)])  # fmt: skip
    # use_cache=False: with a cache, transformers' models ignore the documents that position_ids mark
    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return per_token.view(ids.shape[0], -1).sum(1).double()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, blocks: Any, accelerator: Accelerator, batch_size: int, prefix: str = "eval/",
    document_attention: bool = True, train_mode: bool = False,
) -> dict[str, float]:
    """Loss (nats/token), perplexity and, when blocks carry `num_bytes`, bits per byte over every block in
    `blocks`, summed over all processes' shards. `scripts/evaluate.py` calls exactly this. With
    `document_attention` (data.document_attention, as in training) attention stays inside each document.
    `train_mode` scores the network that training runs (dropout on, the `bdia` coupling's gamma drawn), still
    without gradients."""
    model.train(train_mode)
    loader = accelerator.prepare_data_loader(
        build_dataloader(blocks, batch_size, seed=0, shuffle=False, drop_last=False)
    )
    # Any causal LM scores here (a teacher, a source model): only revformer has a chunked loss.
    chunked_loss = getattr(accelerator.unwrap_model(model).config, "loss_chunk_size", 0) > 0
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # nats, tokens, bytes
    for batch in loader:
        ids = batch["input_ids"]
        with accelerator.autocast():
            position_ids = block_position_ids(accelerator.unwrap_model(model), ids, document_attention)
            nats = sequence_nats(model, ids, chunked_loss, position_ids)  # (B,)
        predicted = torch.full_like(nats, ids.shape[1] - 1)
        nbytes = batch["num_bytes"].to(torch.float64) if "num_bytes" in batch else torch.zeros_like(nats)
        stats = torch.stack([nats, predicted, nbytes], dim=1)  # (B, 3)
        totals += accelerator.gather_for_metrics(stats).sum(0)  # drops the duplicates padding the last batch
    model.train()
    nats, tokens, nbytes = totals.tolist()
    loss = nats / max(tokens, 1)
    metrics = {f"{prefix}loss": loss, f"{prefix}perplexity": math.exp(min(loss, 50))}
    if nbytes > 0:
        metrics[f"{prefix}bpb"] = bits_per_byte(nats, int(nbytes))
    return metrics


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is an interrupted write and never counts)."""
    root = output_dir / CHECKPOINT_DIR
    found = [p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resume_candidates(run: RunConfig) -> list[Path]:
    """Checkpoints to try, newest first: the one asked for, then the complete ones before it."""
    spec = run.train.resume_from_checkpoint
    if spec is None:
        return []
    found = checkpoint_dirs(Path(run.train.output_dir))
    if spec == "latest":
        return found[::-1]  # nothing yet: start fresh, so the same command starts and resumes
    path = Path(spec)
    if not (path / STATE_FILE).exists():
        raise ConfigError(f"resume_from_checkpoint={spec} is not a complete checkpoint (no {STATE_FILE} inside).")
    earlier = [p for p in checkpoint_dirs(path.parent) if int(p.name.split("_")[1]) < int(path.name.split("_")[1])]
    return [path, *earlier[::-1]]


def load_checkpoint(accelerator: Accelerator, candidates: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """`accelerator.load_state` of the newest candidate that loads whole; a damaged one (a truncated file after a
    crash or a full disk) is named in a warning and the previous complete checkpoint is used instead."""
    for i, path in enumerate(candidates):
        try:
            state = json.loads((path / STATE_FILE).read_text())
            accelerator.load_state(str(path))
        except Exception as err:  # safetensors, pickle and json each fail in their own way on a damaged file
            fallback = f"resuming from {candidates[i + 1]} instead" if i + 1 < len(candidates) else "no earlier one"
            accelerator.print(f"warning: checkpoint {path} is damaged and cannot be loaded "
                              f"({type(err).__name__}: {str(err)[:200]}); {fallback}.", file=sys.stderr)
            continue
        return path, state
    if candidates:
        raise ConfigError(f"No checkpoint in {candidates[0].parent} could be loaded; start a fresh run "
                          "(without train.resume_from_checkpoint) or point it at a complete checkpoint.")
    return None


def set_peak_learning_rate(optimizer: Any, scheduler: Any, peak: float) -> float | None:
    """Make a resumed run follow this run's `learning_rate` (a checkpoint stores the old one in its scheduler):
    the advice after a divergence is to resume with a lower one. Returns the old peak if it changed."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the LambdaLR
    old = inner.base_lrs[0]
    inner.base_lrs = [peak for _ in inner.base_lrs]
    lrs = [peak * factor(inner.last_epoch) for factor in inner.lr_lambdas]  # what LambdaLR.step() computes
    for group, lr in zip(optimizer.param_groups, lrs):
        group["initial_lr"], group["lr"] = peak, lr
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    return old if not math.isclose(old, peak, rel_tol=1e-12) else None


def save_checkpoint(accelerator: Accelerator, run: RunConfig, step: int, state: dict[str, Any]) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed into place once whole; keeps the last K."""
    root = Path(run.train.output_dir) / CHECKPOINT_DIR
    final, tmp = root / f"step_{step:07d}", root / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: a checkpoint exists whole or not at all
        for old in checkpoint_dirs(Path(run.train.output_dir))[: -run.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_model_folder(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    run: RunConfig,
    folder: Path,
    metrics: dict[str, float],
) -> None:
    """`save_pretrained` of the gathered full weights, the tokenizer, the run config and a model card."""
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards onto rank 0
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if unwrapped.config.tie_word_embeddings:  # a gathered state dict lists tied weights twice; save them once
            for tied in unwrapped._tied_weights_keys:
                state_dict.pop(tied, None)
        saver = unwrapped
        if type(unwrapped) is not RevformerForCausalLM and isinstance(unwrapped, RevformerForCausalLM):
            # FSDP2 swaps the class for a generated FSDPRevformerForCausalLM; save_pretrained would then copy FSDP's
            # modules as the model code and point auto_map at that class. An empty twin of the real class (no
            # memory: meta tensors) saves the gathered weights with revformer's own code and auto_map.
            with torch.device("meta"):
                saver = RevformerForCausalLM(unwrapped.config)
        saver.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        # The tokenizer then truncates/warns at the model's real limit (a fresh tokenizer says 1e30, i.e. none).
        tokenizer.model_max_length = unwrapped.config.max_position_embeddings
        tokenizer.save_pretrained(folder)
        save_run_config(run, folder / "train_config.yaml")
        (folder / "README.md").write_text(model_card(run, unwrapped, metrics))
    accelerator.wait_for_everyone()


def model_card(run: RunConfig, model: torch.nn.Module, metrics: dict[str, float]) -> str:
    """A Hub model card: YAML metadata (library, tags, datasets, metrics) and how to load the model."""
    config = model.config
    dataset = run.data.dataset
    name = run.train.hub_model_id or Path(run.train.output_dir).name
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [revformer, reversible-transformer, causal-lm, custom_code]",
    ]
    if dataset != "stdlib" and not Path(dataset).exists():
        lines.append(f"datasets: [{dataset}]")
    if metrics:
        lines += [
            "model-index:",
            f"- name: {name}",
            "  results:",
            "  - task: {type: text-generation}",
            f"    dataset: {{name: {dataset}, type: {dataset}}}",
            "    metrics:",
        ]
        for key, value in metrics.items():
            short = key.split("/")[-1]
            lines.append(f"    - {{type: {short}, value: {value:.4f}, name: validation {short}}}")
    lines += [
        "---",
        "",
        f"# {name}",
        "",
        f"{'A reversible decoder-only Transformer' if isinstance(model, RevformerForCausalLM) else type(model).__name__}"
        f" trained with revformer: "
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads, "
        f"attention {sorted(set(getattr(config, 'attention_layers', ['full'])))}, vocabulary {config.vocab_size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters.",
        "",
        f"Training data: `{dataset}`; blocks of {run.data.block_size} tokens; {run.train.max_steps} steps.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {key} | {value:.4f} |" for key, value in metrics.items()],
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the Hub

HUB_RETRY_DELAYS = (10.0, 60.0, 300.0)  # seconds before each retry of a failed upload


def planned_config(run: RunConfig) -> RevformerConfig:
    """The model's config as far as it is known before the tokenizer (all but the vocabulary when from scratch)."""
    if run.train.init_from:
        return AutoConfig.from_pretrained(run.train.init_from, **run.model)
    return run.model_config()


def export_repo_id(run: RunConfig) -> str:
    """Where `push_to_hub` uploads the export: `hub_model_id` suffixed with the architecture, e.g. `me/tiny-llama`."""
    return f"{run.train.hub_model_id}-{export_family(planned_config(run))}"


def check_export(run: RunConfig) -> None:
    """With `export_source`, fail before training when the model has no standard architecture to export as."""
    if not run.train.export_source:
        return
    try:
        check_exportable(planned_config(run))
    except ExportError as err:
        raise ConfigError(f"train.export_source is true, but {err} Or set train.export_source false.") from None


def check_hub_access(run: RunConfig) -> None:
    """With `push_to_hub`, fail before training (not after hours) when not logged in or the repo is not writable."""
    if not run.train.push_to_hub:
        return
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        user = api.whoami()
    except Exception as err:  # no token, a revoked token or no network
        raise ConfigError(
            f"train.push_to_hub is true but the Hub login check failed ({type(err).__name__}: {err}); run "
            "`huggingface-cli login` (or set HF_TOKEN), or set train.push_to_hub false."
        ) from None
    repo_id = run.train.hub_model_id
    try:
        for repo_id in (run.train.hub_model_id, *([export_repo_id(run)] if run.train.export_source else [])):
            api.create_repo(repo_id, private=run.train.hub_private, exist_ok=True)
    except Exception as err:
        raise ConfigError(
            f"Cannot create or write to the Hub repository {repo_id!r} as {user.get('name')!r} "
            f"({type(err).__name__}: {err}); check train.hub_model_id and that the token has write access."
        ) from None


def push_folder(folder: Path, run: RunConfig, message: str, repo_id: str | None = None) -> None:
    """Upload a saved model folder to `repo_id` (default `train.hub_model_id`; created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = repo_id or run.train.hub_model_id
    api.create_repo(repo_id, private=run.train.hub_private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)


def push_with_retries(folder: Path, run: RunConfig, message: str, repo_id: str | None = None) -> Exception | None:
    """`push_folder`, retried after each of HUB_RETRY_DELAYS; returns the last error, or None once it succeeded."""
    error = None
    repo_id = repo_id or run.train.hub_model_id
    for delay in (0.0, *HUB_RETRY_DELAYS):
        time.sleep(delay)
        if not folder.exists():  # a newer checkpoint replaced it; that one is (being) pushed instead
            return None
        try:
            push_folder(folder, run, message, repo_id)
            return None
        except Exception as err:  # network and server errors come in many types; none may end the run
            error = err
            print(f"warning: push of {folder} to {repo_id} failed ({type(err).__name__}: {err})", file=sys.stderr)
    return error


class BackgroundPushes:
    """Checkpoint uploads on one background thread, retried, never stopping training (main process only)."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")

    def submit(self, folder: Path, message: str) -> None:
        self.pool.submit(push_with_retries, folder, self.run, message)

    def finish(self) -> None:
        self.pool.shutdown(wait=True)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: peak RSS


class StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop at the next step boundary (preemption-safe)."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True


# ----------------------------------------------------------------------------- the loop


@dataclass
class Session:
    """What `setup` builds for the loop: the prepared model, its optimizer and data, and where it stands."""

    run: RunConfig
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    batches: TrainBatches
    train_blocks: Any
    val_blocks: Any
    step: int
    stop: StopRequest
    pushes: BackgroundPushes | None
    teacher: torch.nn.Module | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint_step: int = -1
    last_batch: dict[str, torch.Tensor] | None = None
    sp: SequenceParallel | None = None  # train.sequence_parallel_size > 1: this process's sp group

    @property
    def output_dir(self) -> Path:
        return Path(self.run.train.output_dir)


def drop_tied_aliases(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """`save_state` hook: leave a tied LM head out of each checkpoint's state dict, as save_pretrained does (it is
    the embedding; loading fills both). accelerate would drop it too, but with a warning that asks the user to
    check the checkpoint. FSDP checkpoints pass no state dicts here and need nothing."""
    for model, state in zip(models, weights):
        inner = getattr(model, "module", model)  # DDP's wrapper names every key `module.<name>`
        prefix = "module." if inner is not model else ""
        tied = getattr(inner, "_tied_weights_keys", None)
        if not isinstance(tied, dict) or not getattr(getattr(inner, "config", None), "tie_word_embeddings", False):
            continue
        for alias, source in tied.items():
            a, b = state.get(prefix + alias), state.get(prefix + source)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr():
                del state[prefix + alias]


def make_accelerator(run: RunConfig, log_with: str | None) -> Accelerator:
    """The Accelerator of a run, FSDP2 on CPU processes included; checks the batch splits between processes."""
    accelerator = Accelerator(
        mixed_precision=run.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=run.train.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # Each process iterates its own copy of the loader (no dispatch from rank 0): an empty stream then simply
        # ends an epoch instead of failing, which resuming a streamed dataset at an epoch's end relies on.
        dataloader_config=DataLoaderConfiguration(split_batches=True, dispatch_batches=False),
        log_with=log_with,
        project_dir=run.train.output_dir,
        # Without this, accelerate on a CUDA-less machine runs each launched process as a world of one.
        cpu=launched_on_cpu_processes(),
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        enable_fsdp_on_cpu(accelerator)
    accelerator.register_save_state_pre_hook(drop_tied_aliases)
    sp_size = run.train.sequence_parallel_size
    if accelerator.num_processes % sp_size:
        raise ConfigError(f"train.sequence_parallel_size={sp_size} must divide the {accelerator.num_processes} "
                          "processes (processes = data-parallel size x sequence_parallel_size).")
    if run.train.batch_size % (accelerator.num_processes // sp_size):
        raise ConfigError(
            f"train.batch_size={run.train.batch_size} must be divisible by the {accelerator.num_processes // sp_size} "
            "data-parallel processes (it is the global batch, split between them; the processes of a "
            "sequence-parallel group share their sequences)."
        )
    return accelerator


def setup(run: RunConfig) -> Session:
    """Everything before the first step: checks that need no data, tokenizer, data, model, resume, trackers."""
    if run.train.init_from:  # the saved config plus this run's overrides, checked before any tokenizing
        try:
            AutoConfig.from_pretrained(run.train.init_from, **run.model)
        except Exception as err:
            raise ConfigError(f"train.init_from={run.train.init_from}: cannot use its config with the model "
                              f"section {run.model}: {err}") from err
    check_export(run)
    check_hub_access(run)
    log_with = configure_tracking(run)
    accelerator = make_accelerator(run, log_with)
    set_seed(run.train.seed)
    Path(run.train.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.print(
        f"revformer: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )

    tokenizer = build_tokenizer(run, accelerator)
    with accelerator.main_process_first():  # rank 0 tokenizes and packs; the others reuse the datasets cache
        train_blocks, val_blocks = prepare_datasets(run.data, tokenizer)
    model = build_model(run, tokenizer)
    if run.train.compile and isinstance(model, RevformerForCausalLM):
        # The reversible re-run must replay the forward's dropout draws; a sublayer that falls back to eager after
        # dynamo's recompile limit draws different masks and the gradients go wrong silently. Allow the variants a
        # stack needs (attention kinds x grad mode x train/eval x shapes) and fail loudly past them.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        for block in model.model.layers:
            block.attention.compile()
            block.feed_forward.compile()
    optimizer = build_optimizer(model, run)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    sp = None
    if run.train.sequence_parallel_size > 1:  # a (dp, sp) mesh; DDP/FSDP2 reduce gradients over all its ranks
        sp = SequenceParallel(build_mesh(run.train.sequence_parallel_size, accelerator.device.type)["sp"].get_group())
        try:
            set_sequence_parallel(model, sp)
        except ValueError as err:  # heads that do not divide (a fine-tuned model's, checked only now)
            raise ConfigError(str(err)) from None
        config = accelerator.unwrap_model(model).config
        if config.hidden_dropout > 0 or config.attention_dropout > 0:
            # The ranks of a group share one RNG state (bdia's gamma and LSH's rotations must agree between them),
            # so their dropout masks repeat from slice to slice: still dropout, but not the one-process run's.
            accelerator.print(f"warning: dropout (hidden {config.hidden_dropout}, attention "
                              f"{config.attention_dropout}) under sequence parallelism draws the same mask pattern on "
                              "every rank of a group, so this run does not equal a one-process run; set both to 0 "
                              "for that.")
    teacher = build_teacher(run, accelerator.unwrap_model(model), accelerator.device)

    step, position, last_checkpoint_step = 0, {}, -1
    loaded = load_checkpoint(accelerator, resume_candidates(run))
    if loaded is not None:
        checkpoint, state = loaded
        step, last_checkpoint_step = state["step"], state["step"]
        accum = run.train.gradient_accumulation_steps
        if "epoch" in state:
            position = {"epoch": state["epoch"], "index": state["batch_in_epoch"]}
        elif hasattr(train_blocks, "__len__"):  # checkpoints written before positions were recorded
            epoch, index = divmod(step * accum, len(train_blocks) // run.train.batch_size)
            position = {"epoch": epoch, "index": index}
        old_lr = set_peak_learning_rate(optimizer, scheduler, run.train.learning_rate)
        accelerator.print(f"Resumed from {checkpoint} at step {step}."
                          + (f" Peak learning rate {old_lr:g} -> {run.train.learning_rate:g}." if old_lr else ""))
    if log_with:
        accelerator.init_trackers(
            run.train.project_name,
            config=run.to_dict() | {"model_resolved": accelerator.unwrap_model(model).config.to_dict()},
            init_kwargs={"wandb": {"name": run.train.run_name, "dir": run.train.output_dir}},
        )
    stop = StopRequest()  # installed before train_config.yaml appears: from then on a SIGTERM loses nothing
    if accelerator.is_main_process:
        save_run_config(run, Path(run.train.output_dir) / "train_config.yaml")
    pushes = (BackgroundPushes(run) if run.train.push_to_hub and run.train.save_pretrained_with_checkpoints
              and accelerator.is_main_process else None)
    return Session(run, accelerator, tokenizer, model, optimizer, scheduler,
                   TrainBatches(train_blocks, run, accelerator, **position, sp=sp), train_blocks, val_blocks,
                   step, stop, pushes, teacher=teacher, last_checkpoint_step=last_checkpoint_step, sp=sp)


def train_step(s: Session) -> tuple[torch.Tensor, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns (mean loss, grad norm).

    A non-finite loss or gradient raises `NonFiniteError` before the update is applied, so the model and
    optimizer keep the last finite state.
    """
    accelerator, run = s.accelerator, s.run
    accum = run.train.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=accelerator.device)
    grad_norm = float("nan")
    for _ in range(accum):
        batch = next(s.batches)
        with accelerator.accumulate(s.model):
            position_ids = block_position_ids(
                accelerator.unwrap_model(s.model), batch["input_ids"], run.data.document_attention
            )
            distill = {}
            if s.teacher is not None:
                with accelerator.autocast():
                    distill = teacher_targets(s.teacher, batch["input_ids"], position_ids, run.train.distill_ce_weight)
            ids, labels = batch["input_ids"], batch["labels"]
            if s.sp is not None:  # this rank's slice of each sequence (its documents found on the whole of it)
                ids, labels, position_ids = (s.sp.local(x) for x in (ids, labels, position_ids))
            # use_cache=False: with a cache, models other than revformer ignore the documents position_ids mark
            loss = s.model(input_ids=ids, labels=labels, position_ids=position_ids, use_cache=False, **distill).loss
            if not math.isfinite(accelerator.reduce(loss.detach(), "sum").item()):
                raise NonFiniteError(f"loss {loss.item()}", s.step + 1)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                # inf: measure without clipping. The norm is global, so every process takes the same decision.
                grad_norm = float(accelerator.clip_grad_norm_(s.model.parameters(), run.train.max_grad_norm or math.inf))
                if not math.isfinite(grad_norm):
                    s.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteError(f"gradient norm {grad_norm}", s.step + 1)
            s.optimizer.step()
            s.scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
    s.last_batch = batch
    return loss_sum / accum, grad_norm


def parameters_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter this process holds (its shards under FSDP) is finite."""
    return all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters())


def checkpoint(s: Session) -> Path:
    """Checkpoint the current state (never a non-finite one), optionally with a model folder pushed in the background."""
    accelerator = s.accelerator
    local_bad = torch.tensor(float(not parameters_finite(s.model)), device=accelerator.device)
    if accelerator.reduce(local_bad, "sum").item() > 0:
        raise NonFiniteError("parameters", s.step)
    state = {"tokens_seen": s.step * tokens_per_step(s.run), **s.batches.position()}
    path = save_checkpoint(accelerator, s.run, s.step, state)
    s.last_checkpoint_step = s.step
    if s.run.train.save_pretrained_with_checkpoints:
        save_model_folder(accelerator, s.model, s.tokenizer, s.run, path / FINAL_DIR, s.metrics)
        if s.pushes is not None:
            s.pushes.submit(path / FINAL_DIR, f"checkpoint at step {s.step}")
    return path


def tokens_per_step(run: RunConfig) -> int:
    return run.train.batch_size * run.train.gradient_accumulation_steps * run.data.block_size


def evaluate_during_training(s: Session) -> dict[str, float]:
    """A mid-run evaluation: the whole validation split, or a fixed random sample of `eval_batches` batches."""
    cap = s.run.train.eval_batches
    blocks = s.val_blocks
    if cap is not None:
        blocks = sample_blocks(s.val_blocks, cap * s.run.train.batch_size, seed=s.run.train.seed)
    with sequence_parallel_off(s.model):  # evaluation (no activations kept) runs whole sequences on every rank
        return evaluate(s.model, blocks, s.accelerator, s.run.train.batch_size,
                        document_attention=s.run.data.document_attention)


def final_evaluation(s: Session) -> dict[str, float]:
    """The whole validation split (what scripts/evaluate.py reports for the saved model), and the same loss on an
    equal number of training blocks, computed the same way (eval mode, same code), to compare them fairly."""
    documents = s.run.data.document_attention
    count = len(s.val_blocks) if hasattr(s.val_blocks, "__len__") else 512
    train_sample = sample_blocks(s.train_blocks, count, seed=s.run.train.seed)
    with sequence_parallel_off(s.model):
        metrics = evaluate(s.model, s.val_blocks, s.accelerator, s.run.train.batch_size, document_attention=documents)
        train_metrics = evaluate(s.model, train_sample, s.accelerator, s.run.train.batch_size, prefix="eval/train_",
                                 document_attention=documents)
    return metrics | {"eval/train_loss": train_metrics["eval/train_loss"]}


def log_window(s: Session, window: dict[str, Any], grad_norm: float, progress: tqdm) -> None:
    """Log the mean loss over the steps since the last log (the bar shows the same mean, not one batch's)."""
    accelerator, run = s.accelerator, s.run
    elapsed = time.perf_counter() - window["start"]
    logs = {
        "train/loss": accelerator.reduce(window["loss"] / window["steps"], "mean").item(),
        "train/lr": s.scheduler.get_last_lr()[0],
        "train/tokens_per_s": window["steps"] * tokens_per_step(run) / max(elapsed, 1e-9),
        "train/peak_memory_gib": peak_memory_gib(accelerator.device),
        "train/tokens_seen": s.step * tokens_per_step(run),
        "train/grad_norm": grad_norm,
    }
    progress.set_postfix(loss=f"{logs['train/loss']:.3f}", lr=f"{logs['train/lr']:.2e}",
                         tok_s=f"{logs['train/tokens_per_s']:.0f}")
    log_metrics(accelerator, logs, s.step)


def train(run: RunConfig) -> Path:
    """Train (or fine-tune) as `run` says; returns the folder of the final `save_pretrained` model."""
    s = setup(run)
    accelerator = s.accelerator
    stop_at = min(run.train.max_steps, run.train.stop_after_steps or run.train.max_steps)
    # Outside a forward pass FSDP holds only parameter shards, which the standalone inverse cannot run on.
    check_reconstruction = (run.train.reconstruction_check_every > 0 and accelerator.distributed_type != DistributedType.FSDP
                            and isinstance(accelerator.unwrap_model(s.model), RevformerForCausalLM))
    if run.train.eval_batches is not None:
        accelerator.print(f"Mid-run evaluations score a fixed random sample of {run.train.eval_batches} batches of "
                          "the validation split (train.eval_batches); the final one scores all of it.")
    progress = tqdm(total=run.train.max_steps, initial=s.step, disable=not accelerator.is_local_main_process,
                    desc="train", unit="step", dynamic_ncols=True)
    s.model.train()
    window = {"start": time.perf_counter(), "steps": 0, "loss": torch.zeros((), device=accelerator.device)}
    try:
        while s.step < stop_at:
            loss, grad_norm = train_step(s)
            s.step += 1
            window["steps"] += 1
            window["loss"] += loss
            progress.update(1)

            if s.step % run.train.log_every == 0 or s.step == stop_at:
                log_window(s, window, grad_norm, progress)
                window = {"start": time.perf_counter(), "steps": 0, "loss": torch.zeros_like(window["loss"])}
            if check_reconstruction and s.step % run.train.reconstruction_check_every == 0:
                # How exactly backward rebuilds the first layer's input (0.0 with fixed-point streams).
                with torch.no_grad(), accelerator.autocast(), sequence_parallel_off(s.model):
                    error = accelerator.unwrap_model(s.model).model.reconstruction_error(s.last_batch["input_ids"][:1])
                log_metrics(accelerator, {"train/reconstruction_error": error}, s.step)
            if s.step % run.train.eval_every == 0 and s.step < run.train.max_steps:
                s.metrics = evaluate_during_training(s)
                log_metrics(accelerator, s.metrics, s.step)
                progress.write(f"step {s.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in s.metrics.items()))
            stop_now = bool(accelerator.reduce(torch.tensor(float(s.stop.requested), device=accelerator.device), "sum"))
            if s.step % run.train.checkpoint_every == 0 or stop_now or (s.step == stop_at < run.train.max_steps):
                saved = checkpoint(s)
            if stop_now:
                accelerator.print(f"Stopped on request at step {s.step}: saved the checkpoint {saved}; resume with "
                                  "--train.resume_from_checkpoint latest.")
                break
    except NonFiniteError as err:
        progress.close()
        if s.pushes is not None:
            s.pushes.finish()
        end_training(accelerator)
        raise NonFiniteLossError(non_finite_message(err, s)) from None
    progress.close()
    return finish(s)


def non_finite_message(err: NonFiniteError, s: Session) -> str:
    """What diverged, what was kept, and the command that goes on from the last finite checkpoint."""
    found = checkpoint_dirs(s.output_dir)
    head = (f"Non-finite {err.what} at step {err.step}; training stopped before applying that update, and no "
            "checkpoint was written from it.")
    lower = f"{s.run.train.learning_rate / 4:g}"
    if found:
        return (f"{head} The last finite checkpoint is {found[-1]} (step {int(found[-1].name.split('_')[1])}). "
                f"Go on from it with a lower learning rate: --train.resume_from_checkpoint {found[-1]} "
                f"--train.learning_rate {lower} (or set train.max_grad_norm, or use bf16 instead of fp16).")
    return (f"{head} No checkpoint exists yet; start again with a lower learning rate (--train.learning_rate "
            f"{lower}), train.max_grad_norm set, or bf16 instead of fp16.")


def finish(s: Session) -> Path:
    """Final evaluation of the whole validation split, the model folder, and the final Hub push."""
    accelerator, run = s.accelerator, s.run
    final = s.output_dir / FINAL_DIR
    if s.pushes is not None:
        s.pushes.finish()
    if s.step >= run.train.max_steps:
        local_bad = torch.tensor(float(not parameters_finite(s.model)), device=accelerator.device)
        if accelerator.reduce(local_bad, "sum").item() > 0:
            end_training(accelerator)
            raise NonFiniteLossError(non_finite_message(NonFiniteError("parameters", s.step), s))
        s.metrics = final_evaluation(s)
        log_metrics(accelerator, s.metrics, s.step)
        accelerator.print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in s.metrics.items()))
        save_model_folder(accelerator, s.model, s.tokenizer, run, final, s.metrics)
        if accelerator.is_main_process:
            (final / "eval_results.json").write_text(json.dumps({"step": s.step, **s.metrics}, indent=2))
            if run.train.export_source:  # from the saved folder: whole weights under FSDP too, and its card
                exported = export_model(final, s.output_dir / EXPORT_DIR)
                family = export_family(accelerator.unwrap_model(s.model).config)
                accelerator.print(f"Exported the final model as a {family} model to {exported}.")
    # Every rank reaches the teardown together: a gloo rank that destroyed the process group while its peer was
    # still writing the folder was seen to abort (SIGABRT) after a complete run.
    accelerator.wait_for_everyone()
    end_training(accelerator)
    if s.step >= run.train.max_steps and accelerator.is_main_process and run.train.push_to_hub:
        # After the teardown: an upload needs no process group, and no other rank waits on it.
        message = f"revformer: {s.step} steps, bpb {s.metrics['eval/bpb']:.4f}"
        folders = [(final, run.train.hub_model_id)]
        if run.train.export_source:
            folders.append((s.output_dir / EXPORT_DIR, export_repo_id(run)))
        for folder, repo_id in folders:
            error = push_with_retries(folder, run, message, repo_id)
            if error is not None:
                print(f"warning: the final push to {repo_id} failed ({type(error).__name__}: {error}). The "
                      f"model folder {folder} is complete; push it later with\n"
                      f"  huggingface-cli upload {repo_id} {folder} . --repo-type model", file=sys.stderr)
    return final


def main(argv: list[str] | None = None, require_init_from: bool = False) -> Path:
    """Entry point shared by the scripts: `--config FILE` plus `--section.key value` overrides."""
    import argparse

    from .config import config_help, load_run_config

    what = ("Fine-tune a saved revformer model. --train.init_from PATH_OR_HUB_ID (a save_pretrained folder) is "
            "required." if require_init_from else "Pretrain a reversible Transformer LM.")
    parser = argparse.ArgumentParser(allow_abbrev=False, description=what, epilog=config_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run YAML (see configs/); any other option is an override --section.key value")
    args, overrides = parser.parse_known_args(argv)
    try:
        run = load_run_config(args.config, overrides)
        if require_init_from and not run.train.init_from:
            raise ConfigError("Fine-tuning needs --train.init_from PATH_OR_HUB_ID (a save_pretrained folder).")
        return train(run)
    except (ConfigError, DataError, NonFiniteLossError) as err:
        sys.exit(f"error: {err}")


__all__ = ["NonFiniteLossError", "evaluate", "main", "train"]
