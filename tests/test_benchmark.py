"""`python -m benchmarks compare`: every part (`--suite`) through its real code path (fresh worker processes, report)
at tiny sizes; and the worker entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_llama_ckpt_chunked_loss_and_gradients_equal_llama() -> None:
    """The chunked-loss baseline is Llama's loss, only computed in chunks (logits recomputed in backward): the same
    loss and every parameter gradient as plain `llama` (same seed, same weights), with chunks shorter than the
    sequence, two rows, ignored (-100) labels and grouped-query attention."""
    import torch

    from benchmarks.models import Spec, build_model, forward_backward, random_ids

    def run(model_name: str) -> tuple[Any, dict[str, Any], Any]:
        spec = Spec(model_name, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=97, seq_len=50,
                    batch_size=2)
        model = build_model(spec)
        model.loss_chunk = 16  # < 2 x 50 tokens: four chunks, one across the rows
        ids = random_ids(spec)
        labels = ids.clone()
        labels[0, :7] = -100
        labels[1, -3:] = -100
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model

    loss, grads, plain = run("llama")
    chunked_loss, chunked_grads, chunked = run("llama_ckpt_chunked")
    assert type(chunked).__name__ == "ChunkedLossLlamaForCausalLM" and chunked.is_activation_checkpointing
    assert not plain.is_activation_checkpointing and chunked.config.num_key_value_heads == 2
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=0)
    assert set(chunked_grads) == set(grads) and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # The benchmarks' own step takes the chunked path too (the model's forward computes it), with no full logits.
    spec = Spec("llama_ckpt_chunked", hidden_size=32, num_layers=1, num_heads=4, vocab_size=97, seq_len=40)
    model = build_model(spec)
    assert model(input_ids=random_ids(spec), labels=random_ids(spec)).logits is None
    assert float(forward_backward(model, random_ids(spec), "cpu", "fp32")) > 0


def test_spec_key_value_heads_and_hub_shape() -> None:
    """`Spec.num_kv_heads` (0, and records from before the field: as many as heads) reaches Llama's and revformer's
    configs, and `SHAPES["smollm2-135m"]` builds SmolLM2-135M's shape (one layer here, for time)."""
    from benchmarks.models import LABELS, SHAPES, Spec, build_model, spec_from
    from benchmarks.suites.compare.memory import MEMORY_LABELS, MEMORY_VARIANTS

    old = {"model": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 4, "seq_len": 16}  # an older record
    assert Spec(**old).kv_heads == 4 and build_model(Spec(**old)).config.num_key_value_heads == 4
    shape = {**SHAPES["smollm2-135m"], "num_layers": 1}
    for model in ("llama_ckpt_chunked", "revformer"):
        config = build_model(spec_from(shape, model, seq_len=64)).config
        assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (576, 9, 3)
        assert (config.intermediate_size, config.vocab_size, config.rms_norm_eps) == (1536, 49152, 1e-5)
        assert config.rope_parameters["rope_theta"] == 100000.0 and config.tie_word_embeddings
    assert LABELS["llama_ckpt_chunked"] == MEMORY_LABELS["llama_ckpt_chunked"] == "Llama + checkpointing + chunked loss"
    assert MEMORY_VARIANTS["llama_ckpt_chunked"] == ("llama_ckpt_chunked", {})


def test_memory_suite_at_a_hub_shape_with_the_chunked_loss_baseline(tmp_path: Path) -> None:
    """`compare --shape smollm2-135m` measures at SmolLM2-135M's shape (`--set` still overrides: one layer here), with
    `llama_ckpt_chunked` beside `llama_ckpt` (narrowed by `memory.variants`): its figure is below checkpointed
    Llama's (no full logits at 1280 tokens x 49152 vocabulary), and ratios are taken against it."""
    variants = '--set=memory.variants=["llama_ckpt","llama_ckpt_chunked"]'
    run_suite("compare", "--suite", "memory", "--shape", "smollm2-135m", "--models", "llama_ckpt,llama_ckpt_chunked",
              "--out", str(tmp_path), "--set=memory.num_layers=1", "--set=memory.lengths=[1280]",
              "--set=memory.start=256", "--set=memory.longest_max_len=256", "--set=memory.budget_gib=0.5",
              '--set=memory.longest=["llama_ckpt_chunked"]', variants)
    records = read_jsonl(tmp_path / "memory.jsonl")
    growth = {r["variant"]: r for r in records if r["mode"] == "memory" and not r.get("probe")}
    assert set(growth) == {"llama_ckpt", "llama_ckpt_chunked"} and all(r["ok"] for r in growth.values())
    for r in growth.values():
        s = r["spec"]
        assert (s["hidden_size"], s["num_layers"], s["num_heads"], s["num_kv_heads"]) == (576, 1, 9, 3)
        assert (s["vocab_size"], s["rope_theta"], s["rms_norm_eps"], s["seq_len"]) == (49152, 100000.0, 1e-5, 1280)
    assert growth["llama_ckpt_chunked"]["growth_bytes"] < growth["llama_ckpt"]["growth_bytes"]
    longest = {r["variant"]: r for r in records if r["mode"] == "longest"}
    assert set(longest) == {"llama_ckpt_chunked"} and longest["llama_ckpt_chunked"]["longest"] == 256
    readme = (tmp_path / "README.md").read_text()
    assert "| Llama + checkpointing + chunked loss | " in readme
    assert "ratio to Llama + checkpointing + chunked" in readme
    assert "(d=576, 1 layers, 9 heads / 3 key-value heads, vocabulary 49152" in readme
