"""Conversion benchmark: pretrain a Llama teacher, convert it to revformer with each coupling, heal, fine-tune.

Every stage runs through the project's own CLI, so what is measured is what a user runs:

    teacher     a random `LlamaForCausalLM` + byte tokenizer saved to a folder, pretrained by
                `scripts/finetune.py --train.init_from` on the stdlib corpus minus the held-out folders
    convert     `scripts/convert.py TEACHER OUT --coupling C` for each coupling; validation loss at conversion
    heal        `scripts/finetune.py --config configs/heal.yaml --train.distill_from TEACHER` for each coupling,
                and the same revformer shape trained from scratch on the same healing tokens
    finetune    the healed model and the teacher, fine-tuned the same way on the held-out folders
                (text the teacher never saw); then peak activation memory of one forward+backward at 4K tokens

    python scripts/benchmark_conversion.py                       # all stages, results in benchmarks/results/conversion
    python scripts/benchmark_conversion.py --stages teacher      # one stage (each reuses what earlier ones wrote)

Finished stages are skipped on a rerun (their folders hold `eval_results.json`), so a stopped run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "conversion"
# Folders of the stdlib that pretraining never sees: the fine-tuning stage's "new text" (GUI code).
HELD_OUT_FOLDERS = ("idlelib", "tkinter")

# The teacher: a small Llama (grouped-query attention, tied embeddings), bytes as tokens.
TEACHER = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0)
BLOCK = 512
BATCH = 16  # blocks per step: 8192 tokens
TEACHER_STEPS = 750  # 6.1M tokens


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_cli(args: list[str], log_file: Path) -> None:
    """Run a project script in a fresh process; its output goes to `log_file` (the tail is shown on failure)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    with log_file.open("w") as out:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = "\n".join(log_file.read_text().splitlines()[-30:])
        raise SystemExit(f"{' '.join(args)} failed (exit {done.returncode}); log {log_file}:\n{tail}")


def make_corpora(work: Path) -> tuple[Path, Path]:
    """Copies of the stdlib sources: `pretrain/` without the held-out folders, `finetune/` with only them."""
    from revformer.corpus import stdlib_files

    root, files = stdlib_files()
    pretrain, finetune = work / "corpus" / "pretrain", work / "corpus" / "finetune"
    if not (work / "corpus" / "done").exists():
        for rel in files:
            try:
                (root / rel).read_bytes().decode("utf-8")
            except UnicodeDecodeError:  # a few test fixtures are Latin-1 on purpose
                continue
            target = finetune if rel.split("/", 1)[0] in HELD_OUT_FOLDERS else pretrain
            copy = target / f"{rel}.txt"  # local folders are read as .txt/.jsonl/.parquet
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, copy)
        (work / "corpus" / "done").write_text("")
    return pretrain, finetune


def common_args(dataset: Path, out: Path, steps: int, lr: float, warmup: int) -> list[str]:
    return [
        "--data.dataset", str(dataset), "--data.block_size", str(BLOCK), "--train.output_dir", str(out),
        "--train.batch_size", str(BATCH), "--train.max_steps", str(steps), "--train.learning_rate", str(lr),
        "--train.warmup_steps", str(warmup), "--train.report_to", "none", "--train.log_every", "25",
    ]


def stage_teacher(work: Path, steps: int) -> Path:
    """Pretrain the Llama teacher through the trainer (init_from a freshly initialized saved Llama)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from revformer.tokenizer import byte_tokenizer

    pretrain, _ = make_corpora(work)
    final = work / "teacher" / "model"
    if (final / "eval_results.json").exists():
        return final
    init = work / "teacher_init"
    if not init.exists():
        tokenizer = byte_tokenizer()
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEACHER)
        LlamaForCausalLM(config).save_pretrained(init)
        tokenizer.save_pretrained(init)
    log(f"teacher: {steps} steps x {BATCH * BLOCK} tokens")
    run_cli(["scripts/finetune.py", "--train.init_from", str(init), *common_args(pretrain, work / "teacher", steps,
             1.5e-3, 60), "--train.weight_decay", "0.1", "--train.eval_every", "250", "--train.eval_batches", "20",
             "--train.checkpoint_every", "250", "--train.resume_from_checkpoint", "latest"],
            work / "logs" / "teacher.log")
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/benchmark_conversion", help="folder for models and logs")
    parser.add_argument("--stages", default="teacher", help="comma-separated: teacher")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    stages = args.stages.split(",")
    if "teacher" in stages:
        teacher = stage_teacher(work, args.teacher_steps)
        log(f"teacher: {json.loads((teacher / 'eval_results.json').read_text())}")


if __name__ == "__main__":
    main()
