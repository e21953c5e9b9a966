"""Every benchmark suite: one protocol and one entry point (`python -m benchmarks SUITE`, no sys.path edits), and
each suite beside `compare` end to end at tiny sizes into a temporary folder: the records and Markdown it writes hold
real figures. In-process (`benchmarks.suites.main`) where a suite measures in its own process, through
`python -m benchmarks` where it launches workers (fresh processes, torchrun)."""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl


def run_suite(suite: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m benchmarks SUITE ARGS` from the checkout root on one thread, with no PYTHONPATH; it must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    result = subprocess.run([sys.executable, "-m", "benchmarks", suite, *args], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_benchmarks_package_is_not_shipped():
    """benchmarks/ sits beside revformer/ but the wheel holds revformer only."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["revformer*"]
    assert (ROOT / "benchmarks" / "__init__.py").exists()


def test_every_suite_follows_one_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    """Each suite module names itself, declares its options on the entry point's parser and runs from the parsed
    arguments; its `--help` is its docstring. Nothing in the harness edits sys.path, and no script wraps it."""
    from benchmarks import suites

    assert len(suites.SUITES) == 11
    for name in suites.SUITES:
        module = suites.load(name)
        assert module.NAME == name and module.__doc__ and suites.summary(module), name
        for function in (module.arguments, module.run):  # arguments(parser), run(args)
            assert len(inspect.signature(function).parameters) == 1, (name, function)
        parser = suites.parser(name)
        assert isinstance(parser, argparse.ArgumentParser) and parser.prog == f"python -m benchmarks {name}"
        with pytest.raises(SystemExit) as exit_:
            suites.main([name, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks {name}"), name
    for path in (ROOT / "benchmarks").rglob("*.py"):
        assert "sys.path" not in path.read_text(), path
    assert not [p.name for p in (ROOT / "scripts").glob("*.py") if "benchmark" in p.name or "gpu_check" in p.name]
    with pytest.raises(SystemExit, match="unknown benchmark suite"):
        suites.main(["no_such_suite"])


def test_python_m_benchmarks_lists_every_suite() -> None:
    """`python -m benchmarks --help` from the checkout root, no PYTHONPATH: it imports every suite and lists it."""
    from benchmarks.suites import SUITES

    out = run_suite("--help", timeout=120).stdout
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert listed == list(SUITES), out


def test_fixed_point_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.suites import main

    main(["fixed_point", "--tiny", "--out", str(tmp_path)])
    meta, *rows = read_jsonl(tmp_path / "fixed_point_cpu_tiny.jsonl")
    assert meta["kind"] == "meta" and meta["seconds"] > 0 and meta["torch"]
    acc = {(r["depth"], r["streams"], r["fraction_bits"]): r for r in rows if r["kind"] == "accuracy"}
    assert set(acc) == {(d, s, k) for d in (2, 4) for s, k in (("bfloat16", None), ("float32", None),
                                                                 ("fixed_point", 32))} | {(4, "fixed_point", 16)}
    for depth in (2, 4):
        assert acc[(depth, "fixed_point", 32)]["reconstruction_error"] == 0  # bit-exact by construction
        assert acc[(depth, "bfloat16", None)]["reconstruction_error"] > 0
        assert 0 < acc[(depth, "float32", None)]["grad_error_plain"] < 1  # bf16 compute's floor, vs fp64
    (timing,) = [r for r in rows if r["kind"] == "step_time"]
    assert timing["threads"] == 1 and timing["float32_step_s"] > 0 and timing["fixed_point_step_s"] > 0
    table = (tmp_path / "fixed_point_cpu_tiny.md").read_text()
    assert table.startswith("# Fixed-point residual streams") and "| 4 | " in table and "0 (exact)" in table
    assert (tmp_path / "fixed_point_cpu_tiny.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_lsh_leak_and_memory_tiny(tmp_path: Path) -> None:
    from benchmarks.suites import main

    main(["lsh", "leak", "--out", str(tmp_path)])
    leak = {r["kind"]: r for r in read_jsonl(tmp_path / "leak.jsonl")}
    assert set(leak) == {"full", "local", "lsh"}
    for r in leak.values():  # causal: a later token changes no earlier logit (float noise at most)
        assert r["leak_train"] < 1e-5 and r["leak_eval"] < 1e-5 and r["cached_vs_full"] < 1e-4
        assert r["device"] == "cpu" and r["torch"] and r["threads"] >= 1

    run_suite("lsh", "memory", "--tiny", "--kinds", "revformer_lsh,reformer_lsh",
                  "--out", str(tmp_path))
    memory = {r["kind"]: r for r in read_jsonl(tmp_path / "memory.jsonl")}
    assert set(memory) == {"revformer_lsh", "reformer_lsh"}, memory
    for r in memory.values():
        assert r["seq_len"] == 256 and r["chunk"] == 32 and r["step_s"] > 0 and r["loss"] > 0
        assert r["rss_peak_bytes"] > r["static_bytes"] > 0
    assert memory["revformer_lsh"]["memtracker_peak_bytes"] > 0 and "memtracker_peak_bytes" not in memory[
        "reformer_lsh"]  # MemTracker cannot follow Reformer's autograd Function
    table = (tmp_path / "README.md").read_text()
    assert "| revformer_lsh | MemTracker |" in table and "| reformer_lsh | RSS |" in table and "failed" not in table


def test_compile_tiny(tmp_path: Path) -> None:
    """The compile benchmark's steps on a tiny model; aot_eager traces and compiles the graphs (dynamo, AOT
    autograd) without inductor's code generation, which would take most of a minute here."""
    run_suite("compile", "--tiny", "--backend", "aot_eager", "--out", str(tmp_path / "compile_cpu"))
    run, demo = read_jsonl(tmp_path / "compile_cpu.jsonl")
    assert run["ok"] and run["config"] == "tiny" and run["reversible"]
    assert run["grad_rel_error_compiled_vs_eager"] < 1e-4 and run["frames_compiled"] > 0
    assert run["eager_step_s"] > 0 and run["compiled_step_s"] > 0 and len(run["eager_times_s"]) == 2
    assert run["dropout_grad_rel_error_compiled_rev_vs_plain"] < 1e-4  # the re-run replays the dropout masks
    assert demo["config"] == "recompile_limit_demo" and demo["grad_rel_error_rev_vs_plain_limit_8"] < 1e-4
    table = (tmp_path / "compile_cpu.md").read_text()
    assert "| tiny | reversible | 1 x 32 |" in table and "recompile_limit=1" in table


@pytest.mark.slow  # three torchrun processes
def test_fsdp_tiny(tmp_path: Path) -> None:
    run_suite("fsdp", "--tiny", "--results", str(tmp_path))
    rows = read_jsonl(tmp_path / "fsdp_cpu.jsonl")
    assert [(r["world_size"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    alone, *sharded = rows
    for r in sharded:  # each of 2 ranks holds about half of the parameters, gradients and Adam state
        assert r["param_grad_optimizer_bytes_per_rank"] < 0.6 * alone["param_grad_optimizer_bytes_per_rank"]
        assert r["collectives_per_step"]["all_gather"] > 0 and r["collectives_per_step"]["reduce_scatter"] > 0
    assert alone["collectives_per_step"] == {"all_gather": 0, "reduce_scatter": 0}
    assert all(r["peak_bytes"] > 0 and r["loss"] > 0 and r["params"] == alone["params"] > 0 for r in rows)
    assert "| 2 | 1 |" in (tmp_path / "fsdp_cpu.md").read_text()


def test_documents_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.suites import main

    main(["documents", "--tiny", "--out", str(tmp_path / "documents")])
    records = read_jsonl(tmp_path / "documents.jsonl")
    assert [r["attention"] for r in records] == ["full", "mixed full/local/full/lsh"]
    for r in records:
        assert r["ok"] and r["plain_s"] > 0 and r["documents_s"] > 0 and r["ratio"] > 0 and r["block"] == 64
    assert "| mixed full/local/full/lsh | 2 x 64 |" in (tmp_path / "documents.md").read_text()
    assert "documents" in capsys.readouterr().out


def test_data_tiny(tmp_path: Path) -> None:
    from benchmarks.suites import main

    main(["data", "--tiny", "--out", str(tmp_path / "data")])
    (r,) = read_jsonl(tmp_path / "data.jsonl")
    assert r["ok"] and r["vocab"] == 300 and r["block_size"] == 128
    assert r["documents_train"] > r["documents_validation"] > 0 and r["tokens_train"] > r["tokens_validation"] > 0
    assert 1 < r["bytes_per_token"] < 4 and r["tokens_per_s"] > 0  # a 300-token BPE merges a few bytes per token
    assert "| documents (train / validation) |" in (tmp_path / "data.md").read_text()


@pytest.mark.slow  # twenty-odd training workers
def test_depth_quality_tiny(tmp_path: Path) -> None:
    import torch

    from benchmarks.models import ABLATIONS, Spec, build_model

    # The depth-scaled Llama: o_proj and down_proj at std 0.02 / sqrt(2 * 8) = 0.005, every other weight Llama's.
    llama, scaled = (build_model(Spec(model=m, num_layers=8, hidden_size=64)).state_dict()
                     for m in ("llama", "llama_scaled_init"))
    redrawn = [k for k in llama if k.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(redrawn) == 16 and all(torch.equal(llama[k], scaled[k]) for k in llama if k not in redrawn)
    assert abs(torch.cat([scaled[k].flatten() for k in redrawn]).std() - 0.005) < 2e-4
    assert abs(torch.cat([llama[k].flatten() for k in redrawn]).std() - 0.02) < 1e-3

    run_suite("depth_quality", "--tiny", "--jobs", "2", "--out", str(tmp_path))
    sweep = read_jsonl(tmp_path / "sweep.jsonl")
    main = {r["spec"]["model"]: r for r in read_jsonl(tmp_path / "main.jsonl")}
    assert len(sweep) == 8 and all(r["ok"] and r["val_bpb"] > 0 for r in sweep)  # 4 models x 2 rates
    assert {r["spec"]["model"] for r in sweep} == {"revformer", "llama", "revformer_mean", "llama_scaled_init"}
    assert set(main) == {"revformer", "llama", "revformer_mean", "revformer_plain", "llama_scaled_init"}
    assert all(r["ok"] and r["val_bpb"] > 0 and r["spec"]["num_layers"] == 1 for r in main.values())
    assert main["revformer"]["params"] == main["llama"]["params"] == main["llama_scaled_init"]["params"]
    assert main["revformer"]["reconstruction_error"] is not None and main["llama"]["reconstruction_error"] is None
    readme = (tmp_path / "README.md").read_text()
    assert "| 1 | " in readme and "Learning-rate sweep" in readme
    assert "Check, revformer with `reversible=False`" in readme
    rev, scaled_run = main["revformer"], main["llama_scaled_init"]
    gap = f"{100 * (rev['val_bpb'] / scaled_run['val_bpb'] - 1):+.1f}%"
    assert "| Llama, depth-scaled init bpb (lr) | revformer vs depth-scaled Llama |" in readme
    assert f"| {scaled_run['val_bpb']:.4f} ({scaled_run['lr']:g}) | {gap} |" in readme
    assert "| 1 | llama_scaled_init | " in readme and "Llama, depth-scaled init: " in readme
    assert (tmp_path / "depth_quality.png").stat().st_size > 0
    run_suite("depth_quality", "ablate", "--tiny", "--out", str(tmp_path))
    ablations = {(r["spec"]["model"], r["lr"]): r for r in read_jsonl(tmp_path / "ablation.jsonl")}
    rate, *structural = ablations  # the rate ablation first, then each structural change at the best rate so far
    assert rate == ("revformer_mean", 1e-3) and {m for m, _ in structural} == set(ABLATIONS)
    best = min([main["revformer_mean"], ablations[rate]], key=lambda r: r["val_bpb_curve"][0][1])
    assert {lr for _, lr in structural} == {best["lr"]}
    for r in ablations.values():
        assert r["ok"] and r["stopped_at"] == 2 and r["steps"] == 4  # the main runs' schedule
        assert [step for step, _ in r["val_bpb_curve"]] == [2] and r["reconstruction_error"] < 1e-4
    readme = (tmp_path / "README.md").read_text()
    assert "| revformer_mean ablation | lr 0.001 |" in readme
    assert f"| revformer_embed_one ablation | {ABLATIONS['revformer_embed_one']}" in readme
    run_suite("depth_quality", "bdia", "--tiny", "--out", str(tmp_path))
    bdia = {r["spec"]["model"]: r for r in read_jsonl(tmp_path / "bdia.jsonl")}
    assert set(bdia) == {"revformer_bdia", "revformer_bdia_gamma64"}
    for r in bdia.values():
        assert r["ok"] and r["steps"] == 4 and r["lr"] == main["llama"]["lr"]  # Llama's schedule and rate
        assert r["reconstruction_error"] == 0.0  # fixed-point streams: exact
    readme = (tmp_path / "README.md").read_text()
    assert "| revformer, bdia bpb | bdia vs Llama |" in readme and "| 1 | 1/64 |" in readme
    run_suite("depth_quality", "seed", "--tiny", "--out", str(tmp_path))
    (seed,) = read_jsonl(tmp_path / "seed.jsonl")
    assert seed["ok"] and seed["spec"]["seed"] == 1 and seed["spec"]["model"] == "llama"
    assert seed["lr"] == main["llama"]["lr"] and seed["steps"] == main["llama"]["steps"]
    assert "Run-to-run spread: llama at 1 layers" in (tmp_path / "README.md").read_text()
