"""Smoke test of scripts/benchmark.py: its real code path (fresh worker processes, report) on a tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def test_depth_suite_tiny(tmp_path: Path) -> None:
    tiny = ["--set", "depth.depths=[8]", "--set", "depth.seq_len=128", "--set", "depth.hidden_size=32",
            "--set", "depth.steps=1"]  # fmt: skip
    cmd = [sys.executable, str(SCRIPT), "--suite", "depth", "--models", "revformer,revformer_plain",
           "--out", str(tmp_path), "--threads", "1", *tiny]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=150)
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
    cmd = [sys.executable, str(SCRIPT), "--suite", "memory,cost", "--models", "revformer",
           "--out", str(tmp_path), *tiny]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
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
