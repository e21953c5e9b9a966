"""Sequence parallelism: one sequence over 2 or 4 CPU processes (gloo) gives the one-process logits, loss and
gradients, for every kernel and option, alone and beside FSDP2; the trainer's key follows the one-process loss
curve and resumes exactly; bad sizes fail with errors that say what divides what.

Each launch spawns its processes once and sweeps its configurations inside, each against a reference computed in
the same process on the whole sequence.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, end_process_group, env, launch, make_workdir, tiny_config, weights

from revformer import RevformerForCausalLM
from revformer.config import ConfigError, load_run_config
from revformer.sequence_parallel import SequenceParallel, build_mesh, check_heads, set_sequence_parallel

T = 32  # tokens per sequence: 16 per rank at P = 2, 8 at P = 4
KERNELS = {"local_chunk_length": 6, "lsh_chunk_length": 5, "lsh_num_buckets": 4, "lsh_num_hashes": 2}
CASES = {
    "full": {"attention_layers": "full"},
    "local_lsh": {"attention_layers": ["local", "lsh"]},
    "lsh_full_plain": {"attention_layers": ["lsh", "full"], "reversible": False},
    "gqa_qk_norm": {"attention_layers": ["full", "local"], "num_key_value_heads": 2, "qk_norm": True},
    "gqa_one_kv_head": {"attention_layers": ["local", "full"], "num_key_value_heads": 1, "inputs": "left_padding"},
    "bdia": {"attention_layers": ["lsh", "local", "full"], "num_hidden_layers": 3, "coupling": "bdia",
             "bdia_gamma": 0.25},
    "chunked_ff_and_loss": {"attention_layers": ["local", "full"], "chunk_size_feed_forward": 5,
                            "loss_chunk_size": 11},
    "chunked_plain": {"attention_layers": ["full", "lsh"], "chunk_size_feed_forward": 7, "loss_chunk_size": 13,
                      "reversible": False},
    "left_padding": {"attention_layers": ["local", "lsh"], "inputs": "left_padding"},
    "packed_documents": {"attention_layers": ["full", "local", "lsh"], "num_hidden_layers": 3, "inputs": "packed"},
    "fixed_point_bdia_packed": {"attention_layers": ["local", "full"], "coupling": "bdia",
                                "stream_dtype": "fixed_point", "num_key_value_heads": 2, "inputs": "packed"},
}
FSDP_CASES = ("local_lsh", "gqa_qk_norm", "bdia", "chunked_ff_and_loss")


def make_inputs(kind: str | None, batch: int = 2) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (batch, T), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "labels": ids}
    if kind == "left_padding":  # row 0 padded on the left across the whole first slice
        mask = torch.ones_like(ids)
        mask[0, :19] = 0
        inputs |= {"attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    elif kind == "packed":  # documents restarting inside slices and across their borders
        starts = [(0, 7, 20), (0, 15, 17)]
        position_ids = torch.stack([torch.cat([torch.arange(n) for n in torch.diff(torch.tensor([*s, T])).tolist()])
                                    for s in starts[:batch]])
        inputs["position_ids"] = position_ids
    return inputs


def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    torch.manual_seed(1)  # the same LSH rotations, bdia gammas on every rank and in the reference
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), None if out.logits is None else out.logits.detach()


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = grad.detach().clone()
    return grads


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp32 equality up to summation order: rtol 1e-5, atol 1e-6 of the tensor's largest entry."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def compare(name: str, loss, logits, grads, ref_loss, ref_logits, ref_grads) -> list[str]:
    failures = []
    if not close(loss, ref_loss):
        failures.append(f"{name}: loss {loss.item():.8f} != {ref_loss.item():.8f}")
    if (logits is None) != (ref_logits is None) or (logits is not None and not close(logits, ref_logits)):
        failures.append(f"{name}: logits differ")
    for param, ref in ref_grads.items():
        if not close(grads[param], ref):
            error = (grads[param] - ref).abs().max().item()
            failures.append(f"{name}: grad {param} max abs error {error:.2e} (max {ref.abs().max().item():.2e})")
    return failures


def sequence_parallel_case(name: str, overrides: dict, sp: SequenceParallel) -> list[str]:
    """sp alone (dp = 1): the mean of the ranks' losses and gradients (what DDP's averaging gives) equals one
    process on the whole batch."""
    overrides = dict(overrides)
    inputs = make_inputs(overrides.pop("inputs", None))
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(**{**KERNELS, **overrides})).train()
    ref_loss, ref_logits = run(model, inputs)
    ref_grads = full_grads(model)
    model.zero_grad(set_to_none=True)

    set_sequence_parallel(model, sp)
    loss, logits = run(model, {k: sp.local(v) for k, v in inputs.items()})
    set_sequence_parallel(model, None)
    world = dist.get_world_size()
    dist.all_reduce(loss)
    grads = full_grads(model)
    for grad in grads.values():
        dist.all_reduce(grad)
        grad /= world
    logits = None if logits is None else sp.gather(logits)
    return compare(f"{name} sp={sp.size}", loss / world, logits, grads, ref_loss, ref_logits, ref_grads)


def fsdp_case(name: str, overrides: dict, mesh) -> list[str]:
    """sp = 2 x FSDP2 over all four ranks: dp rank d runs row d of the batch."""
    from torch.distributed.fsdp import fully_shard

    overrides = dict(overrides)
    inputs = make_inputs(overrides.pop("inputs", None))
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(**{**KERNELS, **overrides})).train()
    sharded = copy.deepcopy(model)
    ref_loss, _ = run(model, inputs)
    ref_grads = full_grads(model)

    for layer in sharded.model.layers:
        fully_shard(layer.attention)
        fully_shard(layer.feed_forward)
    fully_shard(sharded)
    sp = SequenceParallel(mesh["sp"].get_group())
    set_sequence_parallel(sharded, sp)
    row = mesh["dp"].get_local_rank()
    loss, _ = run(sharded, {k: sp.local(v[row : row + 1]) for k, v in inputs.items()})
    dist.all_reduce(loss)
    return compare(f"{name} fsdp2 dp=2 sp=2", loss / dist.get_world_size(), None, full_grads(sharded), ref_loss, None,
                   ref_grads)


def equality_worker(rank: int, world: int, rendezvous: str, failures_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    failures = []
    try:
        sp = SequenceParallel(build_mesh(world, "cpu")["sp"].get_group())
        for name, overrides in CASES.items():
            failures += sequence_parallel_case(name, overrides, sp)
        if world == 4:
            mesh = build_mesh(2, "cpu")
            for name in FSDP_CASES:
                failures += fsdp_case(name, CASES[name], mesh)
        try:
            build_mesh(3, "cpu")
            failures.append("build_mesh(3) on an even world did not raise")
        except ValueError as err:
            if "does not divide" not in str(err):
                failures.append(f"unclear error: {err}")
    except Exception as err:  # reported, not swallowed: a failing rank must not hang the others' asserts
        failures.append(f"rank {rank}: {type(err).__name__}: {err}")
        raise
    finally:
        Path(f"{failures_path}.{rank}").write_text("\n".join(failures))
        end_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_equals_one_process(tmp_path, world):
    failures = tmp_path / "failures"
    mp.spawn(equality_worker, args=(world, str(tmp_path / "rendezvous"), str(failures)), nprocs=world, join=True)
    reports = [Path(f"{failures}.{rank}").read_text() for rank in range(world)]
    assert all(report == "" for report in reports), "\n".join(reports)[:4000]


# ------------------------------------------------------------------------------------------------ bad sizes


def test_heads_that_do_not_divide_name_the_numbers():
    check_heads(8, 2, 4)  # kv heads divide: split
    check_heads(8, 1, 4)  # kv heads replicated
    with pytest.raises(ValueError, match=re.escape("num_attention_heads=6 is not divisible by "
                                                   "sequence_parallel_size=4")):
        check_heads(6, 2, 4)


def test_config_checks_what_divides_what(tmp_path):
    workdir = make_workdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data.block_size=64 is not divisible by train.sequence_parallel_size=3"):
        load_run_config(workdir / "tiny.yaml", ["--train.sequence_parallel_size", "3"])
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 is not divisible by sequence_parallel_size=8"):
        load_run_config(workdir / "tiny.yaml", ["--train.sequence_parallel_size", "8"])
    with pytest.raises(ConfigError, match=r"train.sequence_parallel_size must be >= 1"):
        load_run_config(workdir / "tiny.yaml", ["--train.sequence_parallel_size", "0"])
    with pytest.raises(ConfigError, match=r"train.distill_from is not supported with train.sequence_parallel_size"):
        load_run_config(workdir / "tiny.yaml", ["--train.sequence_parallel_size", "2", "--train.distill_from", "t"])
    run = load_run_config(workdir / "tiny.yaml", ["--train.sequence_parallel_size", "4", "--model.num_key_value_heads",
                                                  "2"])  # 2 kv heads over 4 ranks: replicated, accepted
    assert run.train.sequence_parallel_size == 4
    # One process cannot hold a group of two: refused before any data is read.
    result = launch("pretrain.py", workdir, "--config", "tiny.yaml", "--train.sequence_parallel_size", "2",
                    "--train.output_dir", str(tmp_path / "out"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "train.sequence_parallel_size=2 must divide the 1 processes" in result.stderr


# ------------------------------------------------------------------------------------------ through the trainer

# Dropout off (one process draws one mask for a whole sequence, two draw one per slice); LSH layers draw rotations,
# which every rank draws alike; packed documents (data.document_attention) cross the slices.
TRAIN = ["--config", "tiny.yaml", "--model.hidden_dropout", "0.0", "--model.attention_layers", "[lsh, local]",
         "--model.lsh_num_buckets", "4", "--model.lsh_chunk_length", "8", "--model.local_chunk_length", "16",
         "--train.max_steps", "6", "--train.checkpoint_every", "3", "--train.log_every", "1"]


def one_thread_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """The one-process reference on one thread, as each of the two processes runs (two threads contend here)."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), *args], check=False,
                            capture_output=True, text=True, cwd=workdir, env=env(workdir, threads=1), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def loss_curve(result: subprocess.CompletedProcess) -> list[float]:
    """The logged loss of every step (log_every 1), from the progress bar, in order and once each."""
    losses = [float(x) for x in re.findall(r"loss=([0-9.]+)", result.stderr)]
    return [x for i, x in enumerate(losses) if i == 0 or x != losses[i - 1]]


def test_trainer_with_sequence_parallel_follows_one_process_resumes_exactly_and_shards(tmp_path):
    workdir = make_workdir(tmp_path)
    single_run = one_thread_run(workdir, *TRAIN, "--train.output_dir", str(workdir / "single"))
    sp = ["--train.sequence_parallel_size", "2"]
    result = launch("pretrain.py", workdir, *TRAIN, *sp, "--train.output_dir", str(workdir / "sp"), processes=2)
    assert "2 process(es), MULTI_CPU" in result.stdout
    curve = loss_curve(single_run)
    assert len(curve) == 6 and curve[-1] < curve[0] and loss_curve(result) == curve  # the same to 3 decimals
    single, parallel = weights(workdir / "single"), weights(workdir / "sp")
    assert parallel.keys() == single.keys()
    for name in single:  # six steps on the same trajectory
        assert torch.allclose(parallel[name], single[name], atol=2e-5, rtol=1e-4), name
    evals = [json.loads((workdir / run / "model" / "eval_results.json").read_text()) for run in ("single", "sp")]
    assert evals[1]["eval/loss"] == pytest.approx(evals[0]["eval/loss"], rel=1e-5)

    # Resumed from the step-3 checkpoint of that run: the same weights, bit for bit.
    launch("pretrain.py", workdir, *TRAIN, *sp, "--train.output_dir", str(workdir / "resumed"),
           "--train.resume_from_checkpoint", str(workdir / "sp" / "checkpoints" / "step_0000003"), processes=2)
    resumed = weights(workdir / "resumed")
    for name in parallel:
        assert torch.equal(resumed[name], parallel[name]), name

    # The same key under FSDP2 (the model state sharded over both ranks of the group).
    result = launch("pretrain.py", workdir, *TRAIN, *sp, "--train.output_dir", str(workdir / "fsdp"), processes=2,
                    accelerate_config="fsdp_cpu.yaml")
    assert "2 process(es), FSDP" in result.stdout and loss_curve(result) == curve
    sharded = weights(workdir / "fsdp")
    for name in single:
        assert torch.allclose(sharded[name], single[name], atol=2e-5, rtol=1e-4), name
