"""Conversion benchmark: pretrain a Llama teacher, convert it to revformer with each coupling, heal, fine-tune.

Every stage runs through the project's own CLI, so what is measured is what a user runs:

    teacher     a random `LlamaForCausalLM` + byte tokenizer saved to a folder, pretrained by
                `scripts/finetune.py --train.init_from` on the stdlib corpus minus the held-out folders
    convert     `scripts/convert.py TEACHER OUT --coupling C` for each coupling; validation loss at conversion
    heal        `scripts/finetune.py --config configs/heal.yaml --train.distill_from TEACHER` for each coupling,
                and the same revformer shape trained from scratch on the same healing tokens
    finetune    the healed model and the teacher, fine-tuned the same way on the held-out folders
                (text the teacher never saw); then peak activation memory of one forward+backward at 4K tokens
                (the converted shape; the teacher plain, with checkpointing, and with checkpointing and a loss over
                1024-token chunks recomputed in backward, as TRL or a fused linear cross-entropy gives users)

    python -m benchmarks conversion                       # all stages, results in benchmarks/results/conversion
    python -m benchmarks conversion --stages teacher      # one stage (each reuses what earlier ones wrote)
    python -m benchmarks conversion --tiny --work DIR     # the whole pipeline at tiny sizes (results in DIR)

Finished stages are skipped on a rerun (their folders hold `eval_results.json`), so a stopped run goes on. The
report also renders the recorded figures of couplings that `convert.py` no longer offers (RETIRED).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import REPO as ROOT
from .. import RESULTS as ALL_RESULTS
from ..probes import proc_status, reset_peak_rss
from ..report import pyplot, save_figure
from ..runner import MALLOC_ENV, emit, run_worker
from . import command

NAME = "conversion"

RESULTS = ALL_RESULTS / "conversion"
# Folders of the stdlib that pretraining never sees: the fine-tuning stage's "new text" (GUI code).
HELD_OUT_FOLDERS = ("idlelib", "tkinter")


# bdia's gamma: the loss of the network training runs (gamma drawn) against the one evaluation runs (gamma = 0).
GAMMAS = (0.5, 0.25, 0.125, 0.0625)


@dataclass(frozen=True)
class Sizes:
    """What the benchmark trains: the teacher's shape, blocks, batch and the steps of every stage."""

    # The teacher: a small Llama (grouped-query attention, tied embeddings), bytes as tokens.
    teacher: dict = field(default_factory=lambda: dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0))
    block: int = 512
    batch: int = 16  # blocks per step: 8192 tokens
    teacher_steps: int = 1250  # 10.24M tokens
    heal_steps: int = 125  # 10% of the teacher's pretraining tokens
    finetune_steps: int = 60  # 0.5M tokens of the held-out folders
    memory_tokens: int = 4096
    memory_layers: tuple = (8, 16)
    # Vocabularies of the memory figures: the teacher's own (bytes), and SmolLM2's, as a converted Hub model has.
    memory_vocabs: tuple = (None, 49152)
    gammas: tuple = GAMMAS  # of the gamma stage
    corpus_files: int | None = None  # every stdlib file


# --tiny: the whole pipeline in a few minutes (the benchmark's own test); nothing it measures means anything.
TINY = Sizes(teacher=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
             block=64, batch=4, teacher_steps=6, heal_steps=3, finetune_steps=3, memory_tokens=256, memory_layers=(2, 4),
             memory_vocabs=(1024,), gammas=(0.5,),
             corpus_files=120)
S = Sizes()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_cli(args: list[str], log_file: Path) -> None:
    """Run a project script in a fresh process; its output goes to `log_file` (the tail is shown on failure)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    with log_file.open("w") as out:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{' '.join(args)} failed (exit {done.returncode}); log {log_file}:\n{tail}")


def make_corpora(work: Path) -> tuple[Path, Path]:
    """Copies of the stdlib sources: `pretrain/` without the held-out folders, `finetune/` with only them."""
    from revformer.corpus import stdlib_files

    root, files = stdlib_files()
    pretrain, finetune = work / "corpus" / "pretrain", work / "corpus" / "finetune"
    if not (work / "corpus" / "done").exists():
        for rel in files[:: max(1, len(files) // S.corpus_files)] if S.corpus_files else files:
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
        "--data.dataset", str(dataset), "--data.block_size", str(S.block), "--train.output_dir", str(out),
        "--train.batch_size", str(S.batch), "--train.max_steps", str(steps), "--train.learning_rate", str(lr),
        "--train.warmup_steps", str(max(1, min(warmup, steps // 5))), "--train.report_to", "none", "--train.log_every", "25",
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
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **S.teacher)
        LlamaForCausalLM(config).save_pretrained(init)
        tokenizer.save_pretrained(init)
    log(f"teacher: {steps} steps x {S.batch * S.block} tokens")
    run_cli(["scripts/finetune.py", "--train.init_from", str(init), *common_args(pretrain, work / "teacher", steps,
             1.5e-3, 60), "--train.weight_decay", "0.1", "--train.eval_every", "250", "--train.eval_batches", "20",
             "--train.checkpoint_every", "250", "--train.resume_from_checkpoint", "latest"],
            work / "logs" / "teacher.log")
    return final


# The couplings compared.
CANDIDATES = {
    "sublayer": ["--coupling", "sublayer"],  # y1 = x1 + A(x2), y2 = x2 + M(y1), the newest stream y2 out
    # p[l+1] = g p[l-1] + (1 - g) p[l] + (1 + g) f_l(p[l]), g = +-1/16 in training, 0 in evaluation (the source)
    "bdia": ["--coupling", "bdia"],
}
# Couplings the library no longer builds; their recorded results stay in results.json and in the report.
RETIRED = {
    "midpoint": "p[l+1] = p[l-1] + 2 f_l(p[l]), first step 1",
    "midpoint_step1": "p[l+1] = p[l-1] + f_l(p[l])",
}
REPORTED = ("midpoint", "sublayer", "midpoint_step1", "bdia")  # the report's row order
# How `sublayer` conversions made now read their output; a recorded conversion without this mark read the mean of
# the two top streams.
SUBLAYER_OUTPUT = "newest stream"
# A conversion this close to the teacher needs no healing: the finetune stage then fine-tunes it as converted too.
NO_HEALING_NEEDED = 0.02


def teacher_loss(results: dict[str, Any]) -> float:
    """The teacher's loss by scripts/evaluate.py, as every converted model is scored (older results: its final
    evaluation in training)."""
    return results.get("teacher/eval", {}).get("loss", results["teacher"]["final_loss"])


def needs_no_healing(results: dict[str, Any], name: str) -> bool:
    """Whether coupling `name` scored within NO_HEALING_NEEDED of the teacher right after conversion."""
    converted = results.get(f"convert/{name}", {}).get("loss")
    return converted is not None and converted <= teacher_loss(results) * (1 + NO_HEALING_NEEDED)
EVAL_LINE = re.compile(r"step (\d+): eval/loss ([0-9.]+)")


def load_results() -> dict[str, Any]:
    path = RESULTS / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_result(key: str, value: Any) -> None:
    """Record one finished measurement at once, so a stopped run keeps what finished."""
    results = load_results()
    results[key] = value
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2))


def unchunked_loss(folder: Path) -> None:
    """Score and train with full logits (loss_chunk_size 0): at a 259-token vocabulary they are small, and
    `evaluate` scores chunked-loss models one block at a time, which would dominate the benchmark's time.
    The memory stage measures the shipped default (chunked) again."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "loss_chunk_size": 0}, indent=2))


def evaluate_cli(model: Path, dataset: Path, log_file: Path, extra: tuple[str, ...] = ()) -> float:
    """Validation loss (nats/token) of a model folder on `dataset`'s whole validation split, by scripts/evaluate.py
    (`extra`: more of its flags)."""
    # A run config naming the corpus: evaluate.py then scores the validation split exactly as training held it out
    # (--data.dataset on the command line would score all of the corpus).
    config = log_file.parent / f"data_{dataset.name}.yaml"
    config.write_text(json.dumps({"data": {"dataset": str(dataset), "block_size": S.block}}))  # JSON is YAML
    run_cli(["scripts/evaluate.py", str(model), "--config", str(config), "--train.batch_size", str(S.batch), *extra],
            log_file)
    text = log_file.read_text(errors="replace")
    return json.loads(text[text.index("{"): text.rindex("}") + 1])["eval/loss"]


def curve(run_dir: Path, log_file: Path) -> dict[str, Any]:
    """Mid-run validation losses (a fixed sample of 20 batches) by tokens, and the final one (the whole split)."""
    text = log_file.read_text(errors="replace")
    points = [(int(step) * S.batch * S.block, float(loss)) for step, loss in EVAL_LINE.findall(text)]
    final = json.loads((run_dir / "model" / "eval_results.json").read_text())
    return {"curve": points, "final_loss": final["eval/loss"], "tokens": final["step"] * S.batch * S.block}


def train_cli(script: str, init: list[str], dataset: Path, out: Path, steps: int, lr: float, warmup: int,
              extra: list[str], name: str, work: Path) -> dict[str, Any]:
    log_file = work / "logs" / f"{name}.log"
    start = time.perf_counter()
    if not (out / "model" / "eval_results.json").exists():
        log(f"{name}: {steps} steps")
        run_cli([script, *init, *common_args(dataset, out, steps, lr, warmup), "--train.eval_every",
                 str(max(steps // 5, 1)), "--train.eval_batches", "20", "--train.checkpoint_every", str(steps),
                 *extra], log_file)
    return {**curve(out, log_file), "learning_rate": lr, "wall_s": round(time.perf_counter() - start)}


def stage_heal(work: Path, teacher: Path, names: list[str]) -> None:
    """Convert with each coupling, score it, heal it by distillation; and the same shape trained from scratch."""
    pretrain, _ = make_corpora(work)
    results = load_results()
    if "teacher/eval" not in results:  # scored by the same command as every converted model
        save_result("teacher/eval", {"loss": evaluate_cli(teacher, pretrain, work / "logs" / "eval_teacher.log")})
    for name in names:
        converted = work / "converted" / name
        if not (converted / "config.json").exists():
            run_cli(["scripts/convert.py", str(teacher), str(converted), *CANDIDATES[name]],
                    work / "logs" / f"convert_{name}.log")
            unchunked_loss(converted)
        if f"convert/{name}" not in results:
            loss = evaluate_cli(converted, pretrain, work / "logs" / f"eval_{name}.log")
            marks = {"output": SUBLAYER_OUTPUT} if name == "sublayer" else {}
            save_result(f"convert/{name}", {"loss": loss, **marks})
        if needs_no_healing(load_results(), name):
            loss = load_results()[f"convert/{name}"]["loss"]
            save_result(f"heal/{name}", {"curve": [], "final_loss": loss, "tokens": 0, "learning_rate": None,
                                         "wall_s": 0})  # nothing to heal
            log(f"heal/{name}: none needed ({loss:.4f} at conversion)")
            continue
        save_result(f"heal/{name}", train_cli(
            "scripts/finetune.py", ["--config", "configs/heal.yaml", "--train.init_from", str(converted),
                                    "--train.distill_from", str(teacher)],
            pretrain, work / "heal" / name, S.heal_steps, 1e-3, 10, [], f"heal_{name}", work))
        log(f"heal/{name}: {load_results()[f'heal/{name}']['final_loss']:.4f}")


def stage_gamma(work: Path, teacher: Path) -> None:
    """bdia at each gamma of S.gammas: the loss of the network training runs (`evaluate.py --train-mode`, gamma
    drawn) on the 20-batch curve sample, against the converted model evaluated (gamma = 0) on the same sample."""
    pretrain, _ = make_corpora(work)
    sample = ("--train.eval_batches", "20")
    results = load_results().get("gamma", {})
    for gamma in S.gammas:
        folder = work / "converted" / f"bdia_g{gamma:g}"
        if f"{gamma:g}" in results:
            continue
        if not (folder / "config.json").exists():
            run_cli(["scripts/convert.py", str(teacher), str(folder), "--coupling", "bdia", "--bdia-gamma",
                     str(gamma)], work / "logs" / f"convert_bdia_g{gamma:g}.log")
            unchunked_loss(folder)
        if "0" not in results:
            results["0"] = evaluate_cli(folder, pretrain, work / "logs" / "eval_gamma_0.log", sample)
        results[f"{gamma:g}"] = evaluate_cli(folder, pretrain, work / "logs" / f"eval_gamma_{gamma:g}.log",
                                             (*sample, "--train-mode"))
        save_result("gamma", results)
        log(f"gamma {gamma:g}: {results[f'{gamma:g}']:.4f} in training (evaluation: {results['0']:.4f})")


def stage_scratch(work: Path, names: list[str]) -> None:
    """The converted shape trained from scratch (cross-entropy) on as many tokens as healing uses."""
    pretrain, _ = make_corpora(work)
    if "scratch" not in load_results():
        config = json.loads((work / "converted" / names[0] / "config.json").read_text())
        shape = []
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "coupling", "stream_dtype", "bdia_gamma"):
            if key in config:
                shape += [f"--model.{key}", str(config[key])]
        save_result("scratch", train_cli(
            "scripts/pretrain.py", ["--data.tokenizer", "byte"], pretrain, work / "scratch", S.heal_steps, 1.5e-3, 10,
            [*shape, "--model.loss_chunk_size", "0", "--train.weight_decay", "0.1"], "scratch", work))


def stage_finetune(work: Path, teacher: Path, healed_name: str, names: list[str]) -> None:
    """Fine-tune the healed model and the teacher alike on text the teacher never saw (the held-out folders), and
    each converted model that is already within NO_HEALING_NEEDED of the teacher as it was converted."""
    _, finetune = make_corpora(work)
    results = load_results()
    runs = [("teacher", teacher)]
    if results.get(f"heal/{healed_name}", {}).get("tokens"):
        runs.append((f"healed_{healed_name}", work / "heal" / healed_name / "model"))
    for name in names:
        if needs_no_healing(results, name):
            runs.append((f"converted_{name}", work / "converted" / name))
    if "gamma" in results and "bdia" in names:  # bdia at the gamma of training from scratch, for comparison
        runs.append((f"converted_bdia_g{max(S.gammas):g}", work / "converted" / f"bdia_g{max(S.gammas):g}"))
    for name, init in runs:
        key = f"finetune/{name}"
        if key in load_results():
            continue
        before = evaluate_cli(init, finetune, work / "logs" / f"eval_finetune_{name}.log")
        result = train_cli("scripts/finetune.py", ["--config", "configs/finetune.yaml", "--train.init_from", str(init)],
                           finetune, work / "finetune" / name, S.finetune_steps, 3e-4, 6, [], f"finetune_{name}", work)
        save_result(key, {"before": before, **result})
        log(f"{key}: {before:.4f} -> {result['final_loss']:.4f}")


def memory_worker(payload: dict[str, Any]) -> None:
    """Worker mode `conversion_memory`: peak memory growth of one forward+backward at `payload["tokens"]` tokens
    beyond weights and gradients (fresh process, glibc returning freed memory at once, so peak RSS tracks live
    tensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import revformer  # noqa: F401  (registers the revformer classes)

    spec, tokens = payload["spec"], payload["tokens"]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    # revformer at its shipped loss chunking (the benchmark trains with full logits); one kernel for any depth
    shipped = {"loss_chunk_size": 256, "attention_layers": "full"} if "revformer" in spec["model"] else {}
    saved = AutoConfig.from_pretrained(spec["folder"])  # rebuilt, so that per-layer fields follow the new depth
    vocab = {"vocab_size": spec["vocab"]} if spec.get("vocab") else {}
    config = type(saved)(**{**saved.to_dict(), "max_position_embeddings": tokens,
                            "num_hidden_layers": spec["layers"], **shipped, **vocab})
    model = AutoModelForCausalLM.from_config(config).train()
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable()

    def loss(ids: Any) -> Any:
        if not spec.get("chunked_loss"):  # older records: no such key (the model's own loss)
            return model(input_ids=ids, labels=ids).loss
        from ..models import chunked_causal_lm_loss  # the teacher's loss over chunks, logits recomputed in backward

        return chunked_causal_lm_loss(model.model(input_ids=ids).last_hidden_state, model.lm_head, ids)

    ids = torch.randint(3, config.vocab_size, (1, tokens))
    loss(ids[:, :256]).backward()  # warm-up: kernels, allocator
    model.zero_grad(set_to_none=True)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    before = proc_status("VmRSS")
    reset_peak_rss()
    loss(ids).backward()
    peak = proc_status("VmHWM") - before
    emit({**spec, "activation_bytes": peak - grad_bytes, "peak_growth_bytes": peak, "torch": torch.__version__,
          "threads": torch.get_num_threads()})


def stage_memory(work: Path, teacher: Path, healed_name: str) -> None:
    """Activation memory of the converted shape, the teacher, the teacher with checkpointing and the teacher with
    checkpointing and a chunked loss at each depth of S.memory_layers, one fresh process per figure."""
    converted = work / "converted" / healed_name  # only the shape matters: each figure runs random weights
    rows = load_results().get("memory", [])  # figures measured before (other couplings) are kept
    for label, folder, checkpointing, chunked in ((f"revformer (converted, {healed_name})", converted, False, False),
                                                  ("teacher + checkpointing", teacher, True, False),
                                                  ("teacher + checkpointing + chunked loss", teacher, True, True),
                                                  ("teacher", teacher, False, False)):
        for vocab in S.memory_vocabs:
            for layers in S.memory_layers:
                if any(row["model"] == label and row["layers"] == layers and row.get("vocab") == vocab
                       for row in rows):
                    continue
                spec = {"model": label, "folder": str(folder), "layers": layers, "checkpointing": checkpointing,
                        "chunked_loss": chunked, "vocab": vocab}
                done = run_worker({"mode": "conversion_memory", "spec": spec, "tokens": S.memory_tokens},
                                  env={**os.environ, **MALLOC_ENV})
                if not done.records:
                    raise SystemExit(f"memory worker failed: {done.stderr[-2000:]}")
                rows.append(done.records[0])
                log(f"memory {label} {layers} layers, vocabulary {vocab or 'own'}: "
                    f"{rows[-1]['activation_bytes'] / 2**20:.0f} MiB")
                save_result("memory", rows)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="runs/benchmark_conversion", help="folder for models and logs")
    parser.add_argument("--stages", default="teacher,heal,gamma,finetune,scratch,memory,report",
                        help="comma-separated: teacher, heal, gamma, finetune, scratch, memory, report")
    parser.add_argument("--couplings", default=",".join(CANDIDATES), help=f"of {list(CANDIDATES)}")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks the pipeline, measures nothing")


def run(args: argparse.Namespace) -> None:
    unknown = set(args.couplings.split(",")) - set(CANDIDATES)
    if unknown:
        retired = " (retired: the library no longer builds them)" * bool(unknown & set(RETIRED))
        raise SystemExit(f"unknown couplings {sorted(unknown)}{retired}; choose from {list(CANDIDATES)}")
    global S, RESULTS
    if args.tiny:
        S, RESULTS = TINY, Path(args.work).resolve() / "results"
    work = Path(args.work).resolve()
    stages = args.stages.split(",")
    teacher = work / "teacher" / "model"
    if "teacher" in stages:
        stage_teacher(work, S.teacher_steps)
        save_result("teacher", curve(work / "teacher", work / "logs" / "teacher.log"))
        log(f"teacher: {load_results()['teacher']['final_loss']:.4f}")
    names = args.couplings.split(",")
    if "heal" in stages:
        stage_heal(work, teacher, names)
    if "gamma" in stages and "bdia" in names:
        stage_gamma(work, teacher)
    healed = best_healed(names)
    if "finetune" in stages:
        stage_finetune(work, teacher, healed, names)
    if "scratch" in stages:
        stage_scratch(work, names)
    if "memory" in stages:
        stage_memory(work, teacher, healed)
    if "report" in stages:
        report()


def recorded_label(label: str, coupling: str) -> str:
    """`label` of a recorded figure, marked when it measured a retired coupling."""
    if coupling not in RETIRED:
        return label
    mark = "retired coupling, recorded"
    return f"{label[:-1]}; {mark})" if label.endswith(")") else f"{label} ({mark})"


def report() -> None:
    """benchmarks/results/conversion/README.md (tables) and healing.png (curves) from results.json."""
    import platform

    import torch

    r = load_results()
    teacher = teacher_loss(r)
    gap = lambda loss: f"{100 * (loss / teacher - 1):+.1f}%"  # noqa: E731
    mtok = lambda tokens: f"{tokens / 1e6:.2f}M"  # noqa: E731
    lines = [
        "# Converting a pretrained Llama into revformer: measured on CPU",
        "",
        f"`{command(NAME)}` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}. Validation loss in nats/token (bytes) on the whole "
        "validation split of the pretraining corpus (the stdlib minus " + ", ".join(HELD_OUT_FOLDERS) + "); curves "
        "in healing.png (mid-run points on a fixed sample of 20 batches).",
        "",
        f"Teacher: LlamaForCausalLM, {S.teacher['num_hidden_layers']} layers, d={S.teacher['hidden_size']}, "
        f"{S.teacher['num_attention_heads']} heads / {S.teacher['num_key_value_heads']} key-value heads, "
        f"{mtok(r['teacher']['tokens'])} tokens: **{teacher:.4f}**.",
        "",
        "Wall times are those of a machine shared with other jobs (they measure no cost of a coupling).",
        "",
        "| coupling | at conversion | healed (KL to the teacher) | vs teacher | healing tokens | wall |",
        "|---|---|---|---|---|---|",
    ]
    for name in REPORTED:
        if f"heal/{name}" in r:
            h = r[f"heal/{name}"]
            healed = f"{h['final_loss']:.4f}" if h["tokens"] else "none needed"
            lines.append(f"| {recorded_label(name, name)} | {r[f'convert/{name}']['loss']:.4f} | {healed} | "
                         f"{gap(h['final_loss'])} | {mtok(h['tokens'])} | {h['wall_s'] / 60:.0f} min |")
    if "scratch" in r:
        sc = r["scratch"]
        lines.append(f"| same shape from scratch (cross-entropy, lr {sc['learning_rate']:g}) | - | {sc['final_loss']:.4f} | "
                     f"{gap(sc['final_loss'])} | {mtok(sc['tokens'])} | {sc['wall_s'] / 60:.0f} min |")
    notes = []
    retired = [name for name in RETIRED if f"heal/{name}" in r]
    if retired:
        which = "; ".join(f"`{name}` ({RETIRED[name]})" for name in retired)
        them = "them" if len(retired) > 1 else "it"
        notes.append(f"Retired coupling{'s' * (len(retired) > 1)} {which}: recorded before the library stopped "
                     f"building {them}; `convert.py` no longer offers {them}.")
    if "heal/sublayer" in r and r.get("convert/sublayer", {}).get("output") != SUBLAYER_OUTPUT:
        notes.append("The `sublayer` row was recorded with the mean of the two top streams as the hidden state; "
                     "`convert.py --coupling sublayer` now outputs the newest stream, not measured here yet.")
    for note in notes:
        lines += ["", note]
    if "gamma" in r:
        g = r["gamma"]
        lines += ["", "bdia's gamma: the loss of the network that training runs (each layer's gamma drawn, "
                  "`evaluate.py --train-mode`) against the converted model as evaluated (gamma = 0, the teacher "
                  f"itself: {g['0']:.4f}), on the 20-batch sample:", "",
                  "| gamma | bits kept per element and layer | loss in training | vs gamma = 0 |", "|---|---|---|---|"]
        for gamma in S.gammas:
            if f"{gamma:g}" in g:
                loss = g[f"{gamma:g}"]
                lines.append(f"| {gamma:g} | {round(-math.log2(gamma))} | {loss:.4f} | "
                             f"{100 * (loss / g['0'] - 1):+.1f}% |")
    finetunes = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("finetune/")}
    if finetunes:
        lines += ["", f"Fine-tuning on the held-out folders ({', '.join(HELD_OUT_FOLDERS)}: text the teacher never "
                  "saw), the same command for every model; validation loss on their own validation split:", "",
                  "| model | before | after fine-tuning | tokens |", "|---|---|---|---|"]
        for name, f in finetunes.items():
            label = recorded_label(name, name.split("_", 1)[-1])
            lines.append(f"| {label} | {f['before']:.4f} | {f['final_loss']:.4f} | {mtok(f['tokens'])} |")
    if "memory" in r:
        for vocab in S.memory_vocabs:
            rows = [row for row in r["memory"] if row.get("vocab") == vocab]
            if not rows:
                continue
            which = f"a vocabulary of {vocab}" if vocab else "the teacher's vocabulary"
            lines += ["", f"Activation memory of one forward+backward at {S.memory_tokens} tokens, batch 1, {which} "
                      "(peak RSS growth minus gradients, fresh process per figure, random weights of each shape):", "",
                      "| model | " + " | ".join(f"{n} layers" for n in S.memory_layers) + " |",
                      "|---" * (len(S.memory_layers) + 1) + "|"]
            by = {}
            for row in rows:
                label = recorded_label(row["model"], Path(row["folder"]).name)
                by.setdefault(label, {})[row["layers"]] = row["activation_bytes"] / 2**20
            for model, cells in by.items():
                lines.append(f"| {model} | " + " | ".join(f"{cells.get(n, float('nan')):.0f} MiB"
                                                         for n in S.memory_layers) + " |")
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    plot(r)
    print("\n".join(lines))


def plot(r: dict[str, Any]) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for name in [*REPORTED, "scratch"]:
        key = name if name == "scratch" else f"heal/{name}"
        if key not in r:
            continue
        points = r[key]["curve"] + [(r[key]["tokens"], r[key]["final_loss"])]
        label = "same shape from scratch" if name == "scratch" else f"{name} (KL healing)"
        ax.plot([t / 1e6 for t, _ in points], [loss for _, loss in points], marker="o", label=label)
    teacher = teacher_loss(r)
    ax.axhline(teacher, color="k", linestyle="--", label="teacher (Llama)")
    ax.axhline(1.02 * teacher, color="grey", linestyle=":", label="teacher + 2%")
    ax.set(xlabel="healing tokens (M)", ylabel="validation loss (nats/byte)", title="Converted Llama, healing by coupling")
    ax.set_ylim(top=min(ax.get_ylim()[1], 2.5 * r["teacher"]["final_loss"]))
    ax.legend()
    save_figure(fig, RESULTS / "healing.png", dpi=120)


def best_healed(names: list[str]) -> str:
    results = load_results()
    healed = {n: results[f"heal/{n}"]["final_loss"] for n in names if f"heal/{n}" in results}
    return min(healed, key=healed.get) if healed else names[0]
