"""The training loop: one straight `train()` over Accelerate, from one CPU process to many GPUs (DDP or FSDP2).

Distribution, mixed precision, gradient accumulation, tracking and checkpoints live here; the model is
single-device code. A run is resumable exactly: model, optimizer, scheduler, RNG and data position.
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
from pathlib import Path
from typing import Any

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
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from .config import ConfigError, RunConfig, save_run_config
from .data import bits_per_byte, build_dataloader, check_block_size, prepare_datasets
from .modeling_revformer import RevformerForCausalLM
from .tokenizer import get_tokenizer, load_tokenizer

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "model"
STATE_FILE = "trainer_state.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good state was checkpointed."""


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


def train_batches(
    train_blocks: Any, run: RunConfig, accelerator: Accelerator, consumed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Global micro-batches forever, epoch after epoch, starting after `consumed` batches.

    The order of each epoch is a pure function of (seed, epoch), so a resumed run sees exactly the batches an
    uninterrupted run would have seen next.
    """
    batch_size = run.train.batch_size
    if hasattr(train_blocks, "__len__"):
        per_epoch = len(train_blocks) // batch_size
        if per_epoch == 0:
            raise ConfigError(
                f"The training split has {len(train_blocks)} blocks, fewer than one batch of {batch_size}; "
                "lower train.batch_size or data.block_size, or use more data."
            )
        epoch, skip = divmod(consumed, per_epoch)
    else:  # streaming: the epoch length is unknown; assume the stream is longer than the run
        epoch, skip = 0, consumed
    while True:
        loader = build_dataloader(train_blocks, batch_size, seed=run.train.seed, epoch=epoch, skip_batches=skip)
        yield from accelerator.prepare_data_loader(loader, device_placement=True)
        epoch, skip = epoch + 1, 0


def sequence_nats(model: torch.nn.Module, ids: torch.Tensor, chunked_loss: bool) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of each sequence in `ids`, as float64, shape (B,)."""
    if chunked_loss:
        # One block at a time through the chunked loss: full-sequence logits are what chunking avoids.
        return torch.stack([model(input_ids=row, labels=row).loss.double() * (ids.shape[1] - 1) for row in ids.split(1)])
    logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V)
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return per_token.view(ids.shape[0], -1).sum(1).double()


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_blocks: Any, run: RunConfig, accelerator: Accelerator) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and bits per byte, summed over all processes' shards."""
    model.eval()
    loader = accelerator.prepare_data_loader(
        build_dataloader(val_blocks, run.train.batch_size, seed=0, shuffle=False, drop_last=False)
    )
    chunked_loss = accelerator.unwrap_model(model).config.loss_chunk_size > 0
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # nats, tokens, bytes
    for i, batch in enumerate(loader):
        if run.train.eval_batches is not None and i >= run.train.eval_batches:
            break
        ids = batch["input_ids"]
        with accelerator.autocast():
            nats = sequence_nats(model, ids, chunked_loss)  # (B,)
        predicted = torch.full_like(nats, ids.shape[1] - 1)
        stats = torch.stack([nats, predicted, batch["num_bytes"].to(torch.float64)], dim=1)  # (B, 3)
        totals += accelerator.gather_for_metrics(stats).sum(0)  # drops the duplicates padding the last batch
    model.train()
    nats, tokens, nbytes = totals.tolist()
    loss = nats / max(tokens, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50)), "eval/bpb": bits_per_byte(nats, int(nbytes))}


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is an interrupted write and never counts)."""
    root = output_dir / CHECKPOINT_DIR
    found = [p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_checkpoint(run: RunConfig) -> Path | None:
    spec = run.train.resume_from_checkpoint
    if spec is None:
        return None
    if spec == "latest":
        found = checkpoint_dirs(Path(run.train.output_dir))
        return found[-1] if found else None  # nothing yet: start fresh, so the same command starts and resumes
    path = Path(spec)
    if not (path / STATE_FILE).exists():
        raise ConfigError(f"resume_from_checkpoint={spec} is not a complete checkpoint (no {STATE_FILE} inside).")
    return path


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
        unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
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
        f"A reversible decoder-only Transformer trained with revformer: "
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_attention_heads} heads, "
        f"attention {sorted(set(config.attention_layers))}, vocabulary {config.vocab_size}, "
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


def push_folder(folder: Path, run: RunConfig, message: str) -> None:
    """Upload a saved model folder to `train.hub_model_id` (created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(run.train.hub_model_id, private=run.train.hub_private, exist_ok=True)
    api.upload_folder(repo_id=run.train.hub_model_id, folder_path=str(folder), commit_message=message)


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


def train(run: RunConfig) -> Path:
    """Train (or fine-tune) as `run` says; returns the folder of the final `save_pretrained` model."""
    output_dir = Path(run.train.output_dir)
    log_with = configure_tracking(run)
    accelerator = Accelerator(
        mixed_precision=run.train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=run.train.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=log_with,
        project_dir=str(output_dir),
        # Without this, accelerate on a CUDA-less machine runs each launched process as a world of one.
        cpu=launched_on_cpu_processes(),
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        enable_fsdp_on_cpu(accelerator)
    if run.train.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"train.batch_size={run.train.batch_size} must be divisible by the {accelerator.num_processes} processes "
            "(it is the global batch, split between them)."
        )
    set_seed(run.train.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.print(
        f"revformer: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )

    tokenizer = build_tokenizer(run, accelerator)
    with accelerator.main_process_first():  # rank 0 tokenizes and packs; the others reuse the datasets cache
        train_blocks, val_blocks = prepare_datasets(run.data, tokenizer)
    model = build_model(run, tokenizer)
    if run.train.compile:
        for block in model.model.layers:
            block.attention.compile()
            block.feed_forward.compile()
    optimizer = build_optimizer(model, run)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    checkpoint = resolve_checkpoint(run)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        step = json.loads((checkpoint / STATE_FILE).read_text())["step"]
        accelerator.print(f"Resumed from {checkpoint} at step {step}.")
    if log_with:
        accelerator.init_trackers(
            run.train.project_name,
            config=run.to_dict() | {"model_resolved": accelerator.unwrap_model(model).config.to_dict()},
            init_kwargs={"wandb": {"name": run.train.run_name, "dir": str(output_dir)}},
        )
    stop = StopRequest()  # installed before train_config.yaml appears: from then on a SIGTERM loses nothing
    if accelerator.is_main_process:
        save_run_config(run, output_dir / "train_config.yaml")

    accum = run.train.gradient_accumulation_steps
    tokens_per_step = run.train.batch_size * accum * run.data.block_size
    batches = train_batches(train_blocks, run, accelerator, consumed=step * accum)
    stop_at = min(run.train.max_steps, run.train.stop_after_steps or run.train.max_steps)
    metrics: dict[str, float] = {}
    # Outside a forward pass FSDP holds only parameter shards, which the standalone inverse cannot run on.
    check_reconstruction = run.train.reconstruction_check_every > 0 and accelerator.distributed_type != DistributedType.FSDP
    progress = tqdm(total=run.train.max_steps, initial=step, disable=not accelerator.is_local_main_process,
                    desc="train", unit="step", dynamic_ncols=True)
    model.train()
    window_start, window_steps = time.perf_counter(), 0
    last_checkpoint_step = step if checkpoint is not None else -1

    def checkpoint_now() -> Path:
        nonlocal last_checkpoint_step
        path = save_checkpoint(accelerator, run, step, {"tokens_seen": step * tokens_per_step})
        last_checkpoint_step = step
        if run.train.save_pretrained_with_checkpoints:
            save_model_folder(accelerator, model, tokenizer, run, path / FINAL_DIR, metrics)
        return path

    while step < stop_at:
        # ---- one optimizer step: `accum` micro-batches through accelerator.accumulate ----
        loss_sum = torch.zeros((), device=accelerator.device)
        for _ in range(accum):
            batch = next(batches)
            with accelerator.accumulate(model):
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
                if not bool(torch.isfinite(accelerator.reduce(loss.detach(), "sum"))):
                    path = checkpoint_now() if last_checkpoint_step != step else checkpoint_dirs(output_dir)[-1]
                    accelerator.end_training()
                    raise NonFiniteLossError(
                        f"Non-finite loss ({loss.item()}) at step {step + 1}; training stopped and the last good state "
                        f"(step {step}) is checkpointed at {path}. Lower train.learning_rate, set train.max_grad_norm, "
                        "or use bf16 instead of fp16; resume with --train.resume_from_checkpoint latest."
                    )
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and run.train.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        step += 1
        window_steps += 1
        progress.update(1)

        # ---- periodic work ----
        if step % run.train.log_every == 0 or step == stop_at:
            elapsed = time.perf_counter() - window_start
            logs = {
                "train/loss": accelerator.reduce(loss_sum / accum, "mean").item(),
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
                "train/peak_memory_gib": peak_memory_gib(accelerator.device),
                "train/tokens_seen": step * tokens_per_step,
            }
            if grad_norm is not None:
                logs["train/grad_norm"] = float(grad_norm)
            progress.set_postfix(loss=f"{logs['train/loss']:.3f}", lr=f"{logs['train/lr']:.2e}",
                                 tok_s=f"{logs['train/tokens_per_s']:.0f}")
            accelerator.log(logs, step=step)
            window_start, window_steps = time.perf_counter(), 0
        if check_reconstruction and step % run.train.reconstruction_check_every == 0:
            # How exactly backward rebuilds the first layer's input (0.0 with fixed-point streams).
            with torch.no_grad(), accelerator.autocast():
                error = accelerator.unwrap_model(model).model.reconstruction_error(batch["input_ids"][:1])
            accelerator.log({"train/reconstruction_error": error}, step=step)
        if step % run.train.eval_every == 0 and step < run.train.max_steps:
            metrics = evaluate(model, val_blocks, run, accelerator)
            accelerator.log(metrics, step=step)
            progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        stop_now = bool(accelerator.reduce(torch.tensor(float(stop.requested), device=accelerator.device), "sum"))
        if step % run.train.checkpoint_every == 0 or stop_now or (step == stop_at < run.train.max_steps):
            path = checkpoint_now()
            if run.train.push_to_hub and run.train.save_pretrained_with_checkpoints and accelerator.is_main_process:
                push_folder(path / FINAL_DIR, run, f"checkpoint at step {step}")
        if stop_now:
            accelerator.print(f"Stopped on request at step {step}; resume with --train.resume_from_checkpoint latest.")
            break
    progress.close()

    final = output_dir / FINAL_DIR
    if step >= run.train.max_steps:
        metrics = evaluate(model, val_blocks, run, accelerator)
        accelerator.log(metrics, step=step)
        accelerator.print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        save_model_folder(accelerator, model, tokenizer, run, final, metrics)
        if accelerator.is_main_process:
            (final / "eval_results.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
            if run.train.push_to_hub:
                push_folder(final, run, f"revformer: {step} steps, bpb {metrics['eval/bpb']:.4f}")
    accelerator.end_training()
    return final


def main(argv: list[str] | None = None, require_init_from: bool = False) -> Path:
    """Entry point shared by the scripts: `--config FILE` plus `--section.key value` overrides."""
    import argparse

    from .config import load_run_config
    from .data import DataError

    parser = argparse.ArgumentParser(allow_abbrev=False, epilog="Any other option is an override: --section.key value")
    parser.add_argument("--config", help="run YAML (see configs/)")
    args, overrides = parser.parse_known_args(argv)
    try:
        run = load_run_config(args.config, overrides)
        if require_init_from and not run.train.init_from:
            raise ConfigError("Fine-tuning needs --train.init_from PATH_OR_HUB_ID (a save_pretrained folder).")
        return train(run)
    except (ConfigError, DataError, NonFiniteLossError) as err:
        sys.exit(f"error: {err}")


__all__ = ["NonFiniteLossError", "evaluate", "main", "train"]
