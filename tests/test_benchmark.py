"""`python -m benchmarks compare`: every part (`--suite`) through its real code path (fresh worker processes, report)
at tiny sizes; and the worker entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl
from test_benchmark_suites import run_suite

COMPARE = [sys.executable, "-m", "benchmarks", "compare"]


def test_depth_suite_tiny(tmp_path: Path) -> None:
    tiny = ["--set", "depth.depths=[8]", "--set", "depth.seq_len=128", "--set", "depth.hidden_size=32",
            "--set", "depth.steps=1"]  # fmt: skip
    cmd = [*COMPARE, "--suite", "depth", "--models", "revformer,revformer_plain",
           "--out", str(tmp_path), "--threads", "1", *tiny]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads(line) for line in (tmp_path / "depth.jsonl").read_text().splitlines()]
    memory = {r["spec"]["model"]: r for r in records if r["mode"] == "memory"}
    timing = {r["spec"]["model"]: r for r in records if r["mode"] == "time"}
    assert set(memory) == set(timing) == {"revformer", "revformer_plain"}, [r.get("error") for r in records]
    for r in [*memory.values(), *timing.values()]:
        assert r["ok"], r
        assert r["device"] == "cpu" and r["torch"] and r["transformers"] and r["cpu"] and r["threads"] == 1
        assert r["spec"]["num_layers"] == 8 and r["spec"]["seq_len"] == 128 and r["spec"]["hidden_size"] == 32
    assert memory["revformer"]["params"] == memory["revformer_plain"]["params"] > 0
    for r in memory.values():
        assert r["peak_source"] == "memtracker"
        assert r["peak_bytes"] > r["static_bytes"] > 0 and r["rss_peak_bytes"] > 0
        assert r["activation_bytes"] == r["peak_bytes"] - r["static_bytes"]
        assert r["memtracker_breakdown"]["Total"] == r["peak_bytes"]
    # Eight layers: the reversible path keeps about one layer's activations, the plain path all eight.
    assert memory["revformer"]["activation_bytes"] < 0.5 * memory["revformer_plain"]["activation_bytes"]
    for r in timing.values():
        assert r["step_s"] > 0 and len(r["step_times_s"]) == 1 and r["tokens_per_s"] > 0

    readme = (tmp_path / "README.md").read_text()
    assert "## Depth sweep" in readme and "## Targets" not in readme  # one depth: no flatness figure yet
    assert (tmp_path / "memory_vs_depth.png").stat().st_size > 0
    assert (tmp_path / "step_time_vs_depth.png").stat().st_size > 0


@pytest.mark.slow  # 6 fresh worker processes
def test_memory_and_cost_suites_tiny(tmp_path: Path) -> None:
    sizes = dict(hidden_size=32, num_heads=2, num_layers=2, vocab_size=512)
    tiny = [f"--set=memory.{k}={v}" for k, v in sizes.items()] + [f"--set=cost.{k}={v}" for k, v in sizes.items()]
    tiny += ["--set=memory.lengths=[256]", "--set=memory.start=256", "--set=memory.longest_max_len=256",
             "--set=memory.budget_gib=0.5", "--set=cost.seq_len=256", "--set=cost.steps=1"]
    cmd = [*COMPARE, "--suite", "memory,cost", "--models", "revformer",
           "--out", str(tmp_path), *tiny]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads(line) for line in (tmp_path / "memory.jsonl").read_text().splitlines()]
    growth = {r["variant"]: r for r in records if r["mode"] == "memory"}
    assert set(growth) == {"revformer", "revformer_no_chunking", "revformer_ff_chunks_only",
                           "revformer_loss_chunks_only"}
    for r in growth.values():
        assert r["ok"] and r["with_optimizer"] is False and r["optimizer_state_bytes"] == 0
        assert r["growth_bytes"] == r["peak_bytes"] - r["param_bytes"] > 0
    longest = {r["variant"]: r for r in records if r["mode"] == "longest"}
    assert longest["revformer"]["longest"] == 256 and longest["revformer"]["capped"]  # the cap fits in 0.5 GiB
    cost = [json.loads(line) for line in (tmp_path / "cost.jsonl").read_text().splitlines()]
    assert sum(r["mode"] == "time" and r["ok"] for r in cost) == 4
    readme = (tmp_path / "README.md").read_text()
    assert "## What a user compares" in readme and "## Cost of the memory options" in readme
    assert (tmp_path / "memory_forward_backward.png").stat().st_size > 0


def test_worker_entry_point() -> None:
    """`python -m benchmarks.worker '<json>'` runs one measurement and prints its record."""
    spec = {"model": "revformer", "hidden_size": 32, "num_heads": 2, "seq_len": 64, "threads": 1}
    payload = json.dumps({"mode": "memory", "spec": spec})
    done = subprocess.run([sys.executable, "-m", "benchmarks.worker", payload], capture_output=True, text=True,
                          timeout=150, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    record = json.loads(line.removeprefix("BENCH_RESULT "))
    assert record["ok"] and record["spec"]["seq_len"] == 64 and record["peak_bytes"] > record["static_bytes"] > 0


@pytest.mark.slow  # 8 fresh worker processes
def test_core_length_longseq_quality_suites_tiny(tmp_path: Path) -> None:
    tiny = {"hidden_size": 32, "num_heads": 2, "num_layers": 2}
    sizes = {
        "core": {**tiny, "seq_len": 128, "depths": [], "time_depth": 2, "steps": 2},
        "length": {**tiny, "start": 256, "max_len": 256, "budget_gib": 0.5},
        "longseq": {**tiny, "lengths": [256], "attentions": ["lsh"], "chunk": 64, "attn_chunk": 32},
        "quality": {**tiny, "seq_len": 64, "batch_size": 2, "steps": 2, "eval_every": 1, "val_blocks": 4,
                    "attention_variants": ["local/lsh"]},
    }
    sets = [f"--set={suite}.{k}={json.dumps(v)}" for suite, kv in sizes.items() for k, v in kv.items()]
    run_suite("compare", "--suite", ",".join(sizes), "--models", "revformer,revformer_plain",
              "--out", str(tmp_path), *sets)

    core = read_jsonl(tmp_path / "core.jsonl")
    timed = {r["spec"]["model"]: r for r in core if r["mode"] == "time"}
    assert set(timed) == {"revformer", "revformer_plain"} and core[-1]["mode"] == "suite"
    assert all(r["ok"] and r["step_s"] > 0 and len(r["step_times_s"]) == 2 for r in timed.values())
    longest = {r["model"]: r for r in read_jsonl(tmp_path / "length.jsonl") if r["mode"] == "longest"}
    assert {m: (r["longest"], r["capped"]) for m, r in longest.items()} == {
        "revformer": (256, True), "revformer_plain": (256, True)}  # the cap fits 0.5 GiB
    longseq = [r for r in read_jsonl(tmp_path / "longseq.jsonl") if r["mode"] == "memory"]
    assert {r["spec"]["chunk"] for r in longseq} == {0, 64} and all(r["spec"]["attention"] == "lsh" for r in longseq)
    assert all(r["ok"] and r["activation_bytes"] > 0 for r in longseq)
    quality = {r["attention_variant"]: r for r in read_jsonl(tmp_path / "quality.jsonl") if r["mode"] == "train"}
    assert set(quality) == {"local/lsh", "full"} and all(r["ok"] for r in quality.values())
    assert quality["local/lsh"]["spec"]["attention"] == ["local", "lsh"]  # one kind per layer
    for r in quality.values():
        assert r["data"].startswith("revformer.data") and r["val_bpb"] > 0 and len(r["val_bpb_curve"]) == 2
    readme = (tmp_path / "README.md").read_text()
    for heading in ("## Targets", "## Core: reversible vs plain", "## Longest trainable sequence",
                    "## Long sequences", "## Quality at equal parameters and tokens"):
        assert heading in readme, heading
    assert "Reversible step time <= 1.4x plain (2 layers)" in readme and "## Failed runs" not in readme
    for plot in ("memory_vs_length.png", "longseq_memory_vs_length.png", "loss_curves.png"):
        assert (tmp_path / plot).stat().st_size > 0
