"""The memory breakdown of one forward+backward (`benchmarks/breakdown.py`, `python -m benchmarks breakdown`): the
replay of torch.profiler's allocation events against allocations of known size and against an independent count on
tiny models, gradients kept out of the activations, the category rules, and the suite's tiny run end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_jsonl
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MiB = 2**20


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread for these tiny steps: with two on a shared machine they mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_replay_counts_what_the_step_allocates_and_leaves_gradients_out() -> None:
    """Known allocations: 2 + 3 MiB of activations alive together, freed; a 4 MiB temporary freed (whose address the
    gradient may reuse); a 4 MiB gradient, then 2 MiB beside it. The activation peak is 5 MiB exactly and the step's
    peak 6 MiB; counting the gradient would make the activation peak 6 MiB, taking the temporary for the gradient
    would leave 4 MiB of activations at the end."""
    from benchmarks.breakdown import activation_timeline

    param = torch.nn.Parameter(torch.zeros(MiB))  # 4 MiB of fp32, allocated before the step: never counted

    def step() -> None:
        a = torch.ones(2 * MiB, dtype=torch.uint8)
        b = torch.ones(3 * MiB, dtype=torch.uint8)
        del a, b
        scratch = torch.empty(4 * MiB, dtype=torch.uint8)
        del scratch
        param.grad = torch.ones(MiB)
        c = torch.ones(2 * MiB, dtype=torch.uint8)
        del c

    r = activation_timeline(step, params=[param], tokens=16, hidden_size=MiB)
    assert r["peak_activation_bytes"] == 5 * MiB
    assert r["peak_total_bytes"] == 6 * MiB
    assert r["gradient_bytes"] == r["param_grad_bytes"] == 4 * MiB
    assert r["end_activation_bytes"] == 0
    assert r["categories"] == r["flat_categories"] == {"other": 5 * MiB}  # nothing here is model code, nor loss
    assert r["flat_peak_bytes"] == r["flat_at_peak_bytes"] == 5 * MiB
    assert r["bytes_per_token_hidden"] == 5 / 16
    assert sorted(row["bytes_each"] for row in r["top"]) == [2 * MiB, 3 * MiB]


class OutputStorages(TorchDispatchMode):
    """An independent count of step memory: the new storages that ops return, with when each dies (weak references),
    in order. Kernel-internal scratch is never returned, so it is not seen, nor is what no op makes (RNG states)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (storage key, +bytes at birth / -bytes at death)
        self.refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, size = st._cdata, st.nbytes()
                if size and key not in self.refs and st.data_ptr() not in given:
                    self.events.append((key, size))
                    self.refs[key] = weakref.ref(st, lambda _, k=key, n=size: self.died(k, n))
        return out

    def died(self, key: int, size: int) -> None:
        self.refs.pop(key, None)
        self.events.append((key, -size))

    def peak_without(self, grads: set[int]) -> int:
        """Peak live bytes, leaving out the storages alive at the end whose key is in `grads` (keys are reused)."""
        alive: dict[int, int] = {}  # key -> index of the birth of the storage that has it now
        for i, (key, size) in enumerate(self.events):
            if size > 0:
                alive[key] = i
            else:
                alive.pop(key)
        skip = {alive[k] for k in grads if k in alive}  # the gradients' births; they do not die in the step
        live = peak = 0
        for i, (_, size) in enumerate(self.events):
            if i not in skip:
                live += size
                peak = max(peak, live)
        return peak


@pytest.mark.parametrize("model", ["revformer", "revformer_bdia", "llama_ckpt_chunked"])
def test_breakdown_of_tiny_models_agrees_with_an_independent_count(model: str) -> None:
    """Tiny models (d=64, 2 layers, 256 tokens, revformer's chunks 64 so its chunked paths run). The peak activation
    bytes against `OutputStorages` on the same step, gradients left out the same way, within 15%: the profiler also
    sees the scratch that kernels allocate inside (sdpa's backward buffers), and the dispatch mode's Python
    references make autograd add the tied embedding's second gradient out of place, so that the first (V x d) lives
    on as a temporary in its count. Categories add up to the peak; every gradient is found, so no activation is
    left at the end; the rules name nearly every byte (at most 1% "other")."""
    from benchmarks.breakdown import activation_timeline
    from benchmarks.models import Spec, build_model, forward_backward, param_stats, random_ids

    chunk = 64 if model.startswith("revformer") else None
    spec = Spec(model=model, hidden_size=64, num_layers=2, seq_len=256, chunk=chunk)
    net = build_model(spec)
    ids = random_ids(spec)
    forward_backward(net, ids, "cpu", "fp32")  # lazily built state exists before the measured steps
    net.zero_grad(set_to_none=True)
    r = activation_timeline(lambda: forward_backward(net, ids, "cpu", "fp32"), params=net.parameters(),
                            tokens=spec.seq_len, hidden_size=spec.hidden_size)

    net.zero_grad(set_to_none=True)
    count = OutputStorages()
    with count:
        forward_backward(net, ids, "cpu", "fp32")
    counted = count.peak_without({p.grad.untyped_storage()._cdata for p in net.parameters()})
    assert abs(r["peak_activation_bytes"] - counted) <= 0.15 * counted, (r["peak_activation_bytes"], counted)

    assert sum(r["categories"].values()) == r["peak_activation_bytes"] > 0
    assert sum(r["flat_categories"].values()) == r["flat_peak_bytes"] >= r["flat_at_peak_bytes"]
    assert "loss chunk" not in r["flat_categories"]
    assert r["flat_at_peak_bytes"] == r["peak_activation_bytes"] - r["categories"].get("loss chunk", 0)
    assert r["gradient_bytes"] == param_stats(net)["grad_bytes"]
    assert r["end_activation_bytes"] == 0
    assert r["peak_total_bytes"] >= r["peak_activation_bytes"]
    assert r["categories"].get("other", 0) <= 0.01 * r["peak_activation_bytes"], r["top"]
    assert r["peak"]["phase"] == "backward"
    expected = {"streams", "rotary tables"} if model.startswith("revformer") else {"checkpointed layer inputs",
                                                                                  "rotary tables"}
    assert expected <= set(r["categories"]), r["categories"]
    assert r["bytes_per_token_hidden"] == r["peak_activation_bytes"] / (spec.seq_len * spec.hidden_size)


def test_rules_name_the_code_that_allocated() -> None:
    """The rule table on contexts as the profiler gives them (innermost first; "fwd:" = the forward op of the
    autograd node that allocated): first match wins, nothing matched is "other"."""
    from benchmarks.breakdown import categorize

    rerun = ["revformer/reversible.py:_rerun", "revformer/reversible.py:backward", "op:ReversibleStackBackward"]
    assert categorize(["revformer/reversible.py:subtract", "revformer/reversible.py:unjoin", *rerun]) == "streams"
    assert categorize(["revformer/reversible.py:backward", "op:aten::add", "op:ReversibleStackBackward"]) == (
        "stream gradients")
    assert categorize(["revformer/reversible.py:_backprop", "op:aten::mm", *rerun,
                       "fwd:op:aten::mm", "fwd:module:Linear", "fwd:module:RevformerAttention"]) == "re-run: attention"
    assert categorize(["revformer/modeling_revformer.py:forward_chunk", "module:RevformerFeedForward",
                       *rerun]) == "re-run: feed-forward"
    assert categorize(["revformer/loss.py:_chunk_loss", "revformer/loss.py:forward"]) == "loss chunk"
    assert categorize(["transformers/models/llama/modeling_llama.py:forward", "module:LlamaDecoderLayer",
                       "torch/utils/checkpoint.py:checkpoint"]) == "checkpointed layer inputs"
    assert categorize(["transformers/models/llama/modeling_llama.py:forward", "module:LlamaMLP",
                       "torch/utils/checkpoint.py:recompute_fn"]) == "layer recompute"
    assert categorize(["benchmarks/models.py:forward_backward", "op:aten::mul", "fwd:module:LlamaDecoderLayer"]) == (
        "layer backward")
    assert categorize(["somewhere/else.py:f", "op:aten::empty"]) == "other"


def test_suite_tiny_writes_records_and_table(tmp_path: Path) -> None:
    """`python -m benchmarks breakdown --tiny` (two models, each in a fresh worker): one record per model and a
    README with two tables, at the peak of activations and at the peak of the flat part: their categories, totals in
    MiB and bytes per token and hidden unit, where each peak is, the machine and the command that reproduces it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1")
    args = ["--tiny", "--models", "revformer,llama_ckpt_chunked", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "benchmarks", "breakdown", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = read_jsonl(tmp_path / "breakdown.jsonl")
    assert [r["spec"]["model"] for r in records] == ["revformer", "llama_ckpt_chunked"]
    assert all(r["ok"] and r["mode"] == "breakdown" and r["suite"] == "breakdown" and r["torch"] for r in records)
    readme = (tmp_path / "README.md").read_text()
    assert readme in done.stdout
    at_peak, at_flat = (part.split("\n## ")[0] for part in readme.split("## At the peak of ")[1:])
    assert at_peak.startswith("activations") and at_flat.startswith("the flat part")
    peak_rows, flat_rows = ({line.split(" | ")[0][2:]: [c.strip(" |") for c in line.split(" | ")[1:]]
                             for line in part.splitlines() if line.startswith("| ")} for part in (at_peak, at_flat))
    assert peak_rows["MiB (bytes / token / hidden unit)"] == ["revformer (default config)",
                                                              "Llama + checkpointing + chunked loss"]
    units = 256 * 64

    def cell(value: int) -> str:
        return f"{value / MiB:.1f} ({value / units:.2f})"

    for i, r in enumerate(records):
        assert peak_rows["**peak activations**"][i] == cell(r["peak_activation_bytes"])
        assert peak_rows["**flat part at this peak**"][i] == cell(r["flat_at_peak_bytes"])
        assert flat_rows["**flat peak (loss chunk excluded)**"][i] == cell(r["flat_peak_bytes"])
        for name, value in r["categories"].items():
            assert peak_rows[name][i] == cell(value)
        for name, value in r["flat_categories"].items():
            assert flat_rows[name][i] == cell(value)
        assert peak_rows["where the peak is"][i] == f"{r['peak']['phase']}: {r['peak']['category']}"
    for name in ("streams", "stream gradients", "checkpointed layer inputs", "layer recompute"):
        assert name in flat_rows, name
    assert "python -m benchmarks breakdown --tiny --models revformer,llama_ckpt_chunked" in readme
    assert f"torch {torch.__version__}" in readme
