"""The whole GPU verification of revformer as one command, under a total time cap (default 8 minutes).

    python -m benchmarks gpu_check              # on a CUDA machine: results in benchmarks/results/cuda/<gpu-name>/
    python -m benchmarks gpu_check --dry-run    # the same stages end to end on the CPU at tiny sizes (CI runs this)

Stages, in order of importance (a stage that runs out of its share of the time is stopped, its partial results
kept, and the next one starts; unused time passes to later stages):

1. ``env``: device, driver, torch / CUDA / transformers versions, SDPA kernel availability;
2. ``tests``: ``pytest -m gpu tests/test_cuda.py`` (gradient parity with CUDA RNG replay, fixed-point exactness,
   kernels vs reference, SDPA backend per call, fp16 + GradScaler, memory flat in depth, cached generation);
3. ``core``: ``compare --suite core`` in bf16 at 12 x 1024, 8K tokens: reversible vs plain vs Llama (+/-
   checkpointing) step time, and from it model FLOPs utilization (MFU) at 8K tokens on full attention;
4. ``length``: the longest-sequence targets for the enwik8 recipe (configs/enwik8_reformer.yaml, 12 x 1024,
   default memory options): does one training step fit at 1M tokens (its local/LSH layers) and at 256K tokens with
   full (flash) attention; then the next doubling, or the half when the target fails;
5. ``depth``: ``compare --suite depth`` (memory only): activation memory against depth at GPU sizes;
6. ``longseq``: ``compare --suite longseq``: peak memory against length per attention kind;
7. ``memory``: ``compare --suite memory``: revformer's memory options against Llama +/- checkpointing.

Everything goes to the output folder: ``gpu_check.log`` (the console), ``env.json``, ``tests.*``, ``bench/`` (the
compare parts' JSON lines, tables and plots), ``length_targets.jsonl`` and ``SUMMARY.md`` / ``summary.json``
(the GPU targets: reversible bf16 step <= 1.25x plain at 12 x 1024 and 8K tokens; longest sequence >= 1M tokens
with local/LSH and >= 256K with full attention; MFU >= 40% at 8K). Installs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .. import REPO, RESULTS
from ..env import cpu_name, git_commit, gpu_slug
from ..report import read_records
from ..runner import RESULT_PREFIX, emit, parse_records, run_command, worker_command
from . import argv_of, command, compare

NAME = "gpu_check"

RECIPE = REPO / "configs" / "enwik8_reformer.yaml"
MiB, GiB = 2**20, 2**30
BYTE_VOCAB = 259  # the byte tokenizer: 256 bytes + 3 specials

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name, for MFU; --peak-tflops overrides.
PEAK_BF16_TFLOPS = (
    ("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)
TARGETS = {"step_ratio": 1.25, "full_tokens": 2**18, "recipe_tokens": 2**20, "mfu": 0.40}
# Nominal seconds per stage on a GPU: each stage gets this share of whatever time is left when it starts.
STAGE_SHARES = {"env": 5, "tests": 100, "core": 75, "length": 100, "depth": 70, "longseq": 75, "memory": 55}


# --------------------------------------------------------------------------------------------------- helpers


def peak_tflops(gpu_name: str) -> float | None:
    """Dense bf16 peak of a GPU by (NVIDIA) name, e.g. 'NVIDIA H100 80GB HBM3' -> 989.4; None when unknown."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in gpu_name.lower():
            return value
    return None


def model_flops_per_token(params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Model FLOPs of one training token, PaLM's convention (appendix B): 6 N + 12 L d T.

    N counts every weight that multiplies activations (with a tied embedding, the LM head; the lookup itself is
    free, norm weights are negligible), 12 L d T the attention scores and their weighted sum over all T keys.
    Recomputation (the reversible re-run, checkpointing) is not model FLOPs, so it lowers MFU.
    """
    return 6.0 * params + 12.0 * num_layers * hidden_size * seq_len


def mfu_rows(core_records: list[dict[str, Any]], peak: float | None) -> list[dict[str, Any]]:
    """Achieved model TFLOP/s and MFU of every timed model of the core suite."""
    rows = []
    for r in core_records:
        if r.get("mode") != "time" or not r.get("ok"):
            continue
        s = r["spec"]
        flops = model_flops_per_token(r["params"], s["num_layers"], s["hidden_size"], s["seq_len"])
        achieved = flops * r["tokens_per_s"] / 1e12
        rows.append({"model": s["model"], "seq_len": s["seq_len"], "num_layers": s["num_layers"],
                     "hidden_size": s["hidden_size"], "params": r["params"], "step_s": r["step_s"],
                     "tokens_per_s": r["tokens_per_s"], "model_tflops_per_token": flops / 1e12,
                     "achieved_tflops": achieved, "mfu": achieved / peak if peak else None})
    return rows


class Console:
    """Print and append to gpu_check.log."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")


# ----------------------------------------------------------------------------------------- sizes per mode


def bench_sets(dry: bool) -> dict[str, list[str]]:
    """`compare --set` overrides of each part: GPU sizes that fit the cap, or tiny CPU sizes."""
    if dry:
        tiny = {"hidden_size": 32, "num_heads": 2}
        return {
            "core": {**tiny, "seq_len": 128, "depths": [], "time_depth": 2, "steps": 2},
            "depth": {**tiny, "seq_len": 128, "depths": [2, 4]},
            # no lengths: the suite runs (arguments, sizes, table) without its six workers, which are the depth
            # stage's memory worker again; keeps the CI rehearsal short
            "longseq": {**tiny, "num_layers": 2, "lengths": [], "chunk": 64, "attn_chunk": 32},
        }
    return {
        # The step-time target's shape: 12 x 1024, 8K tokens (memory is the depth suite's job).
        "core": {"hidden_size": 1024, "num_heads": 16, "seq_len": 8192, "depths": [], "time_depth": 12, "steps": 10},
        "depth": {"hidden_size": 1024, "num_heads": 16, "seq_len": 4096, "depths": [2, 12, 48]},
        "longseq": {"hidden_size": 512, "num_heads": 8, "num_layers": 4, "lengths": [65536, 262144],
                    "full_max_len": 262144, "chunk": 4096, "attn_chunk": 256},
    }


def shrink(sizes: dict[str, Any]) -> dict[str, Any]:
    """Tiny CPU values for the size keys a suite is known to use (a suite added later keeps its other keys)."""
    tiny = {"hidden_size": 32, "num_heads": 2, "num_layers": 2, "seq_len": 128, "steps": 1, "vocab_size": 512,
            "intermediate_size": 64, "batch_size": 1, "chunk": 64, "attn_chunk": 32}
    out = {}
    for key, value in sizes.items():
        if key in tiny:
            out[key] = tiny[key]
        elif key in ("depths", "lengths") and isinstance(value, list):
            out[key] = [2] if key == "depths" else [256]
        elif key.endswith("len") and isinstance(value, int):
            out[key] = min(value, 256)
    return out


def probe_plan(dry: bool) -> list[dict[str, Any]]:
    """The length-target probes: (name, model overrides, target tokens); beyond/below probes are added later."""
    if dry:
        tiny = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                "attention_layers": ["local", "lsh"], "local_chunk_length": 16, "lsh_chunk_length": 16,
                "lsh_num_buckets": 4, "chunk_size_feed_forward": 64, "loss_chunk_size": 64}
        return [{"name": "recipe", "overrides": tiny, "target": 512},
                {"name": "full", "overrides": {**tiny, "attention_layers": "full"}, "target": 256}]
    return [{"name": "recipe", "overrides": {}, "target": TARGETS["recipe_tokens"]},
            {"name": "full", "overrides": {"attention_layers": "full"}, "target": TARGETS["full_tokens"]}]


# -------------------------------------------------------------------------------------- worker: length probe


def probe_worker(payload: dict[str, Any]) -> None:
    """Worker mode `length_probe`: one bf16 training step (fused AdamW) of the enwik8 recipe's model at `seq_len`:
    fits or out of memory."""
    import torch
    import yaml

    from revformer import RevformerConfig, RevformerForCausalLM

    from ..models import train_step
    from ..probes import proc_status

    device, seq_len = torch.device(payload["device"]), payload["seq_len"]
    model_cfg = {**yaml.safe_load(RECIPE.read_text())["model"], **payload["overrides"],
                 "max_position_embeddings": seq_len}
    record: dict[str, Any] = {"mode": "probe", "name": payload["name"], "seq_len": seq_len, "device": device.type,
                              "model": model_cfg}
    torch.manual_seed(0)
    with device:
        model = RevformerForCausalLM(RevformerConfig(vocab_size=BYTE_VOCAB, **model_cfg)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    record["params"] = sum(p.numel() for p in model.parameters())

    def step(length: int) -> float:
        ids = torch.randint(3, BYTE_VOCAB, (1, length), device=device)
        return train_step(model, optimizer, ids, device.type, "bf16")

    step(min(seq_len, 1024))  # creates the optimizer state, so the measured step's peak includes it
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        loss = step(seq_len)
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError as exc:
        record.update(ok=True, fits=False, oom=str(exc).splitlines()[0][:300])
    else:
        record.update(ok=True, fits=True, loss=loss, step_s=time.perf_counter() - start)
    if cuda:
        record.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_source="cuda_max_memory_allocated",
                      total_bytes=torch.cuda.get_device_properties(device).total_memory)
    else:
        record.update(peak_bytes=proc_status("VmHWM"), peak_source="process_peak_rss")
    emit(record)


# ---------------------------------------------------------------------------------------------------- stages


class Check:
    """Runs the stages in order under one deadline and collects what each produced."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.out: Path = args.out
        self.bench = self.out / "bench"
        self.bench.mkdir(parents=True, exist_ok=True)
        self.console = Console(self.out / "gpu_check.log")
        self.start = time.perf_counter()
        self.deadline = self.start + args.cap_s
        self.stages: dict[str, dict[str, Any]] = {}
        self.env: dict[str, Any] = {}

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self, name: str, pending: list[str]) -> float:
        """This stage's share of the time left, in proportion to the nominal shares of the stages still to run."""
        total = sum(STAGE_SHARES[s] for s in pending)
        return max(0.0, self.remaining() * STAGE_SHARES[name] / total)

    def python_env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("WANDB_MODE", "offline")
        return env

    def run(self, stages: list[str]) -> None:
        self.console(f"== gpu_check{' --dry-run (CPU, tiny sizes)' if self.dry else ''}: stages {', '.join(stages)};"
                     f" cap {self.args.cap_s:.0f} s; results in {self.out}")
        for i, name in enumerate(stages):
            budget = self.share(name, stages[i:])
            if budget < 3:
                self.stages[name] = {"status": "skipped: time cap reached", "wall_s": 0}
                self.console(f"== {name}: skipped (time cap reached)")
                continue
            self.console(f"== {name}: up to {budget:.0f} s ({self.remaining():.0f} s left in total)")
            t = time.perf_counter()
            try:
                status = getattr(self, f"stage_{name}")(budget)
            except Exception as exc:  # a broken stage must not stop the others: record it and go on
                status = {"status": f"error: {type(exc).__name__}: {exc}"}
            status["wall_s"] = round(time.perf_counter() - t, 1)
            self.stages[name] = status
            self.console(f"== {name}: {status['status']} in {status['wall_s']} s")
        self.write_summary()

    # -- 1. environment
    def stage_env(self, budget: float) -> dict[str, Any]:
        import platform

        import torch
        import transformers

        env: dict[str, Any] = {"dry_run": self.dry, "device": self.device, "torch": torch.__version__,
                               "cuda": torch.version.cuda, "transformers": transformers.__version__,
                               "python": platform.python_version(), "cpu": cpu_name(), "cpu_count": os.cpu_count()}
        env["git_commit"] = git_commit()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                       gpu_memory_gib=round(props.total_memory / GiB, 1), capability=f"{props.major}.{props.minor}",
                       flash_sdp=torch.backends.cuda.is_flash_attention_available(),
                       bf16_supported=torch.cuda.is_bf16_supported())
            try:
                env["nvidia_smi"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                     "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                env["nvidia_smi"] = None
        elif not self.dry:
            raise SystemExit("No CUDA device visible to torch: run with --dry-run for the CPU rehearsal.")
        peak = self.args.peak_tflops or (peak_tflops(env.get("gpu", "")) if not self.dry else None)
        env["peak_bf16_tflops"] = peak
        self.env = env
        (self.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        name = env.get("gpu") or f"CPU {env['cpu']}"
        self.console(f"device: {name}" + (f", {env['gpu_memory_gib']} GiB, capability {env['capability']}"
                                          if "gpu" in env else "")
                     + f"; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}; "
                     + f"peak bf16 {peak or 'unknown'} TFLOP/s")
        return {"status": "ok", "device": name}

    # -- 2. CUDA tests
    def stage_tests(self, budget: float) -> dict[str, Any]:
        for suffix in ("jsonl", "xml", "log"):
            (self.out / f"tests.{suffix}").unlink(missing_ok=True)
        select = ["-k", "cpu and (generation or model_trains)"] if self.dry else ["-m", "gpu"]
        cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", *select, "-q", "-rfE", "-p", "no:cacheprovider",
               f"--junitxml={self.out / 'tests.xml'}"]
        env = dict(self.python_env(), REVFORMER_TEST_REPORT=str(self.out / "tests.jsonl"))
        result = run_command(cmd, self.console, budget, env, log=self.out / "tests.log")
        counts = junit_counts(self.out / "tests.xml")
        result.update(counts)
        if result["timed_out"]:
            result["status"] = "timed out"
        elif counts.get("tests", 0) == 0:
            result["status"] = f"no tests ran (rc {result['rc']})"
        else:
            result["status"] = "ok" if counts["failures"] + counts["errors"] == 0 else "failures"
        return result

    # -- 3-7. benchmark suites
    def benchmark(self, suite: str, budget: float, models: str, extra: list[str] | None = None,
                  sizes: dict[str, Any] | None = None) -> dict[str, Any]:
        cmd = argv_of(compare.NAME, "--suite", suite, "--device", self.device, "--dtype", "bf16", "--models", models,
                      "--out", str(self.bench), "--no-report", "--threads", str(self.args.threads),
                      "--worker-timeout", str(max(10, int(budget))), *(extra or []))
        for key, value in (sizes or {}).items():
            cmd += ["--set", f"{suite}.{key}={json.dumps(value)}"]
        result = run_command(cmd, self.console, budget, self.python_env())
        records = [r for r in read_records(self.bench / f"{suite}.jsonl") if r.get("mode") != "suite"]
        failed = [r for r in records if not r.get("ok") and not r.get("over_budget")]
        result.update(records=len(records), failed_records=len(failed))
        result["status"] = ("timed out (partial results kept)" if result["timed_out"] else
                            "ok" if result["rc"] == 0 and not failed else f"rc {result['rc']}, {len(failed)} failed")
        return result

    def stage_core(self, budget: float) -> dict[str, Any]:
        return self.benchmark("core", budget, "revformer,revformer_plain,llama,llama_ckpt",
                              sizes=bench_sets(self.dry)["core"])

    def stage_depth(self, budget: float) -> dict[str, Any]:
        models = "revformer" if self.dry else "revformer,revformer_plain,llama_ckpt"  # dry: 2 workers, not 6
        return self.benchmark("depth", budget, models, ["--skip-time"],
                              sizes=bench_sets(self.dry)["depth"])

    def stage_longseq(self, budget: float) -> dict[str, Any]:
        return self.benchmark("longseq", budget, "revformer", sizes=bench_sets(self.dry)["longseq"])

    def stage_memory(self, budget: float) -> dict[str, Any]:
        # One length, no longest-sequence search (the length stage has the targets): revformer's memory options
        # against Llama +/- checkpointing at the suite's realistic vocabulary. Dry run: one Llama worker.
        if self.dry:
            defaults = compare.defaults("cpu")["memory"]
            return self.benchmark("memory", budget, "llama", sizes={**shrink(defaults), "longest": []})
        return self.benchmark("memory", budget, "revformer,llama,llama_ckpt",
                              sizes={"lengths": [32768], "longest": []})  # []: no variant searched

    # -- 4. longest-sequence targets
    def stage_length(self, budget: float) -> dict[str, Any]:
        path = self.out / "length_targets.jsonl"
        path.unlink(missing_ok=True)
        end = time.perf_counter() + budget
        queue = [dict(p, seq_len=p["target"]) for p in probe_plan(self.dry)]
        results: dict[str, dict[int, bool | None]] = {}
        while queue:
            probe = queue.pop(0)
            left = end - time.perf_counter()
            if left < 5:
                break
            payload = {"name": probe["name"], "overrides": probe["overrides"], "seq_len": probe["seq_len"],
                       "device": self.device}
            record = self.run_probe(payload, left)
            record["target"] = probe["target"]
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            fits = record.get("fits") if record.get("ok") else None
            results.setdefault(probe["name"], {})[probe["seq_len"]] = fits
            peak = f", peak {record['peak_bytes'] / GiB:.2f} GiB" if record.get("peak_bytes") else ""
            self.console(f"[length] {probe['name']} at {probe['seq_len']} tokens: "
                         f"{ {True: 'fits', False: 'out of memory', None: 'no answer'}[fits]}{peak}")
            # One step further out from the target: the next doubling if it fits, the half if it does not.
            if probe["seq_len"] == probe["target"] and fits is not None and not self.dry:
                queue.append(dict(probe, seq_len=probe["target"] * 2 if fits else probe["target"] // 2))
        answered = sum(v is not None for r in results.values() for v in r.values())
        status = "ok" if answered and answered == sum(len(r) for r in results.values()) else "incomplete"
        return {"status": status, "probes": {k: {str(t): f for t, f in v.items()} for k, v in results.items()}}

    def run_probe(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        cmd = worker_command({"mode": "length_probe", **payload})
        captured: list[str] = []
        console = self.console

        class Tee:  # keep the worker's result line while streaming its output
            def __call__(self, text: str) -> None:
                captured.append(text.strip())
                if not text.strip().startswith(RESULT_PREFIX):
                    console(text)

        result = run_command(cmd, Tee(), timeout, self.python_env())
        for record in parse_records(captured):
            return {**record, "worker_wall_s": result["wall_s"]}
        why = "timed out" if result["timed_out"] else f"rc {result['rc']}"
        return {"mode": "probe", **payload, "ok": False, "error": f"{why}: " + " | ".join(captured[-5:])[-1500:],
                "worker_wall_s": result["wall_s"]}

    # -- summary
    def write_summary(self) -> None:
        # The parts' own tables and plots (compare.report, minus parts that measured nothing: a part cut off
        # by the cap, or run with no sizes, leaves at most its provenance line, which the renderer cannot take).
        res = {s: read_records(self.bench / f"{s}.jsonl") for s in compare.PARTS}
        res = {s: rs for s, rs in res.items() if any(r.get("mode") != "suite" for r in rs)}
        if res:
            try:
                compare.render_plots(self.bench, res)
                (self.bench / "README.md").write_text(compare.render_markdown(self.bench, res))
            except Exception as exc:  # the summary matters more than the plots
                self.console(f"benchmark report failed: {type(exc).__name__}: {exc}")
        summary = build_summary(self.out, self.env, self.stages, time.perf_counter() - self.start, self.args.cap_s)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        text = render_summary(summary, self.out)
        (self.out / "SUMMARY.md").write_text(text)
        self.console(text)


def junit_counts(path: Path) -> dict[str, Any]:
    """Test counts and failed test names from pytest's JUnit XML."""
    if not path.exists():
        return {}
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


# ----------------------------------------------------------------------------------------------------- summary


def build_summary(out: Path, env: dict[str, Any], stages: dict[str, Any], wall: float, cap: float) -> dict[str, Any]:
    """Every GPU target figure, with met / missed / not measured against its target."""
    bench = out / "bench"
    core = read_records(bench / "core.jsonl")
    peak = env.get("peak_bf16_tflops")
    mfu = mfu_rows(core, peak)
    times = {r["model"]: r for r in mfu}
    targets: list[dict[str, Any]] = []

    def target(name: str, figure: str, met: bool | None) -> None:
        targets.append({"target": name, "figure": figure,
                        "status": "not measured" if met is None else ("met" if met else "missed")})

    if "revformer" in times and "revformer_plain" in times:
        rev, plain = times["revformer"], times["revformer_plain"]
        ratio = rev["step_s"] / plain["step_s"]
        shape = f"{rev['num_layers']} x {rev['hidden_size']}, {rev['seq_len']} tokens"
        extra = ""
        if "llama_ckpt" in times:
            extra = f"; vs Llama + checkpointing {rev['step_s'] / times['llama_ckpt']['step_s']:.2f}x"
        target(f"reversible bf16 step <= {TARGETS['step_ratio']}x plain (12 x 1024, 8K tokens)",
               f"{ratio:.2f}x ({rev['step_s'] * 1e3:.1f} ms vs {plain['step_s'] * 1e3:.1f} ms at {shape}){extra}",
               ratio <= TARGETS["step_ratio"])
    else:
        target(f"reversible bf16 step <= {TARGETS['step_ratio']}x plain (12 x 1024, 8K tokens)", "–", None)
    probes = [r for r in read_records(out / "length_targets.jsonl") if r.get("ok")]
    for name, label in (("recipe", "local/LSH layers (enwik8 recipe)"), ("full", "full (flash) attention")):
        runs = sorted((r for r in probes if r["name"] == name), key=lambda r: r["seq_len"])
        goal = next((r["target"] for r in runs), None) or TARGETS[f"{name}_tokens"]
        fit = [r["seq_len"] for r in runs if r["fits"]]
        failed = [r["seq_len"] for r in runs if not r["fits"]]
        if not runs:
            target(f"longest trainable sequence >= {goal:,} tokens with {label}", "–", None)
            continue
        figure = (f"fits at {', '.join(f'{t:,}' for t in fit) or 'none probed'}"
                  + (f"; out of memory at {', '.join(f'{t:,}' for t in failed)}" if failed else ""))
        peaks = [f"{r['seq_len']:,}: {r['peak_bytes'] / GiB:.1f} GiB" for r in runs if r["fits"] and r.get("peak_bytes")]
        if peaks:
            figure += f" (peak {'; '.join(peaks)})"
        target(f"longest trainable sequence >= {goal:,} tokens with {label}", figure,
               goal in fit if goal in fit or goal in failed else None)
    rev_mfu = times.get("revformer", {}).get("mfu")
    if "revformer" in times:
        r = times["revformer"]
        figure = (f"{rev_mfu:.1%}" if rev_mfu is not None else "peak unknown") + \
                 f" ({r['achieved_tflops']:.3g} model TFLOP/s at {r['seq_len']} tokens, full attention)"
        target(f"MFU >= {TARGETS['mfu']:.0%} at 8K tokens (reversible, bf16)", figure,
               None if rev_mfu is None else rev_mfu >= TARGETS["mfu"])
    else:
        target(f"MFU >= {TARGETS['mfu']:.0%} at 8K tokens (reversible, bf16)", "–", None)
    depth = [r for r in read_records(bench / "depth.jsonl") if r.get("mode") == "memory" and r.get("ok")
             and not r.get("over_budget") and r["spec"]["model"] == "revformer"]
    if len(depth) >= 2:
        lo = min(depth, key=lambda r: r["spec"]["num_layers"])
        hi = max(depth, key=lambda r: r["spec"]["num_layers"])
        d_peak, d_static = hi["peak_bytes"] - lo["peak_bytes"], hi["static_bytes"] - lo["static_bytes"]
        target("activation memory flat in depth: peak(deep) - peak(shallow) <= 1.05 x added param/grad/AdamW bytes",
               f"{lo['spec']['num_layers']} -> {hi['spec']['num_layers']} layers: +{d_peak / MiB:.0f} MiB vs "
               f"+{d_static / MiB:.0f} MiB of state; activation {lo['activation_bytes'] / MiB:.0f} -> "
               f"{hi['activation_bytes'] / MiB:.0f} MiB", d_peak <= 1.05 * d_static)
    return {"env": env, "wall_s": round(wall, 1), "cap_s": cap, "stages": stages, "targets": targets, "mfu": mfu,
            "tests_report": read_records(out / "tests.jsonl"), "length_probes": read_records(out / "length_targets.jsonl")}


def render_summary(summary: dict[str, Any], out: Path) -> str:
    env = summary["env"]
    device = env.get("gpu") or f"CPU {env.get('cpu')}"
    lines = [f"# GPU check: {device}" + (" (dry run at tiny sizes: the numbers mean nothing)" if env.get("dry_run")
                                          else ""), "",
             (f"`{command(NAME, *(['--dry-run'] if env.get('dry_run') else []))}`, "
              f"{summary['wall_s']:.0f} s of a {summary['cap_s']:.0f} s cap; torch {env.get('torch')} (CUDA "
              f"{env.get('cuda')}), transformers {env.get('transformers')}, commit "
              f"{(env.get('git_commit') or 'unknown')[:10]}"
              + (f"; {env.get('nvidia_smi')}" if env.get("nvidia_smi") else "") + "."), "",
             "## Targets", "", "| target | figure | status |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['figure']} | **{t['status']}** |" for t in summary["targets"]]
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for name, s in summary["stages"].items():
        detail = s["status"]
        if name == "tests" and "tests" in s:
            detail += f" ({s['passed']} passed, {s['failures'] + s['errors']} failed, {s['skipped']} skipped)"
            if s.get("failed_tests"):
                detail += ": " + ", ".join(t.split("::")[-1] for t in s["failed_tests"][:8])
        lines.append(f"| {name} | {detail} | {s.get('wall_s', 0)} |")
    if summary["mfu"]:
        lines += ["", "## Step time and MFU (bf16, batch 1; PaLM model FLOPs 6N + 12LdT, recomputation excluded)", "",
                  "| model | step (ms) | tokens/s | model TFLOP/s | MFU |", "|---|---|---|---|---|"]
        for r in summary["mfu"]:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "–"
            lines.append(f"| {r['model']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['achieved_tflops']:.3g} | {mfu} |")
    if summary["tests_report"]:
        lines += ["", "## Values the CUDA tests measured", ""]
        for r in summary["tests_report"]:
            values = {k: v for k, v in r.items() if k not in ("test", "device")}
            lines.append(f"- `{r['test'].split('::')[-1]}`: " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    lines += ["", "Raw data: `summary.json`, `env.json`, `tests.*`, `length_targets.jsonl`, `bench/*.jsonl` "
              "(tables and plots: `bench/README.md`); console: `gpu_check.log`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- CLI


def device_folder() -> str:
    import torch

    if not torch.cuda.is_available():
        return "dry-run-cpu"
    return gpu_slug()


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes (no GPU needed)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results/cuda/<gpu name>, or .../dry-run-cpu)")
    p.add_argument("--cap-s", type=float, default=480.0, help="total time cap in seconds (default 8 minutes)")
    p.add_argument("--stages", default=",".join(STAGE_SHARES),
                   help=f"comma-separated subset of {','.join(STAGE_SHARES)} (env always runs)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU if the GPU is not known")
    p.add_argument("--threads", type=int, default=1, help="torch threads per benchmark worker")


def run(args: argparse.Namespace) -> int:
    stages = ["env"] + [s for s in args.stages.split(",") if s and s != "env"]
    unknown = set(stages) - set(STAGE_SHARES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGE_SHARES)}")
    if args.out is None:
        args.out = RESULTS / "cuda" / ("dry-run-cpu" if args.dry_run else device_folder())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.log").unlink(missing_ok=True)
    check = Check(args)
    check.run(stages)
    return 0 if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in check.stages.values()) else 1
