"""The memory options in combination with every parallel mode: 1 process, DDP and FSDP2 (2 CPU processes, gloo).

Two sweeps. The first calls the model directly: for a grid of configurations (chunked feed-forward, chunked loss,
`full`/`local`/`lsh` layers, dropout, fixed-point streams, every coupling and stream merge, the options of converted Llama-family
models, reversible or plain) both ranks run the same batch under
the same seed, so DDP's and FSDP2's averaged gradients must equal one unsharded backward. The second trains through
the real scripts with every option on at once plus gradient accumulation, and compares the final weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from conftest import end_process_group, launch, make_workdir, relative_error, tiny_config, weights
from revformer import RevformerForCausalLM

OPTIONS = dict(chunk_size_feed_forward=5, chunk_size_attention=6, loss_chunk_size=11, local_chunk_length=6, lsh_chunk_length=6,
               lsh_num_buckets=4, lsh_num_hashes=2)
GRID = {
    "chunked_full": dict(attention_layers="full"),
    "chunked_local_lsh_dropout": dict(attention_layers=["local", "lsh", "full"], hidden_dropout=0.1,
                                      attention_dropout=0.1),
    "chunked_fixed_point": dict(attention_layers=["lsh", "local", "full"], stream_dtype="fixed_point",
                                tie_word_embeddings=False),  # a parameter after the stack
    "unchunked_reference": dict(attention_layers=["local", "lsh", "full"], chunk_size_feed_forward=0,
                                chunk_size_attention=0, loss_chunk_size=0),
    # What converted Llama-family models bring, with both couplings and every kernel.
    "llama_options_sublayer": dict(attention_layers=["local", "lsh", "full"], num_key_value_heads=2, head_dim=12,
                                   qkv_bias=True, qk_norm=True, tie_word_embeddings=False, hidden_dropout=0.1),
    "llama_options_bdia": dict(attention_layers=["full", "local", "lsh"], coupling="bdia", bdia_gamma=0.25,
                               num_key_value_heads=1, attention_bias=True, mlp_bias=True, qk_norm=True,
                               tie_word_embeddings=False, hidden_dropout=0.1),
    "bdia_even_fixed_point": dict(attention_layers="full", num_hidden_layers=4, coupling="bdia",
                                  num_key_value_heads=2, stream_dtype="fixed_point"),
    "bdia_fixed_point": dict(attention_layers=["lsh", "full", "local"], coupling="bdia", stream_dtype="fixed_point",
                             num_key_value_heads=2, qk_norm=True, tie_word_embeddings=False, hidden_dropout=0.1),
}


def gradients(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks and LSH rotations on every rank and in the reference
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name.removeprefix("module.")] = grad.detach().clone()
    return grads


def compare_worker(rank: int, rendezvous: str, failures_path: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    # A rendezvous file, not a TCP port: no other process on the machine can take it between choice and use.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    failures = []
    try:
        for name, overrides in GRID.items():
            for reversible in (True, False):
                torch.manual_seed(0)
                config = tiny_config(**{"num_hidden_layers": 3, "reversible": reversible, **OPTIONS, **overrides})
                model = RevformerForCausalLM(config).train()
                ids = torch.randint(3, 128, (2, 29), generator=torch.Generator().manual_seed(2))
                reference = gradients(model, ids)

                ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
                sharded = copy.deepcopy(model)
                for block in sharded.model.layers:  # the units the trainer shards (_no_split_modules)
                    fully_shard(block.attention)
                    fully_shard(block.feed_forward)
                fully_shard(sharded)
                for mode, wrapped in (("ddp", ddp), ("fsdp2", sharded)):
                    for step in range(2):  # a second step catches state left over from the first
                        grads = gradients(wrapped, ids)
                        for param, ref in reference.items():
                            error = relative_error(grads[param], ref)
                            if error > 1e-5:
                                failures.append(f"{name} reversible={reversible} {mode} step {step}: {param} "
                                                f"relative error {error:.2e}")
    finally:
        if rank == 0:
            Path(failures_path).write_text("\n".join(failures))
        end_process_group()


def test_ddp_and_fsdp2_gradients_equal_one_unsharded_backward_for_every_option(tmp_path):
    failures = tmp_path / "failures.txt"
    mp.spawn(compare_worker, args=(str(tmp_path / "rendezvous"), str(failures)), nprocs=2, join=True)
    assert failures.read_text() == "", failures.read_text()[:3000]


# ------------------------------------------------------------------------ training through the scripts (slow)

TRAIN = ["--train.max_steps", "4", "--train.gradient_accumulation_steps", "2", "--train.checkpoint_every", "100"]


@pytest.fixture(scope="module")
def grid_workdir(tmp_path_factory) -> Path:
    workdir = make_workdir(tmp_path_factory.mktemp("grid"))
    config = yaml.safe_load((workdir / "tiny.yaml").read_text())
    # Every memory option at once, chunks that do not divide the 64-token blocks; dropout off because ranks draw
    # their masks from separate RNG streams while one process draws them from one.
    config["model"].update(OPTIONS, attention_layers=["local", "lsh"], hidden_dropout=0.0,
                           chunk_size_feed_forward=24, loss_chunk_size=40)
    (workdir / "grid.yaml").write_text(yaml.safe_dump(config))
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("stream_dtype", ["fixed_point"])  # float32 streams: test_fsdp.py, test_trainer.py
def test_one_process_ddp_and_fsdp2_train_to_the_same_weights(grid_workdir, stream_dtype):
    common = ["--config", "grid.yaml", "--model.stream_dtype", stream_dtype, *TRAIN]
    runs = {"single": dict(processes=1), "ddp": dict(processes=2),
            "fsdp": dict(processes=2, accelerate_config="fsdp_cpu.yaml")}
    for mode, how in runs.items():
        launch("pretrain.py", grid_workdir, *common, "--train.output_dir", str(grid_workdir / f"{mode}_{stream_dtype}"),
               **how)
    single = weights(grid_workdir / f"single_{stream_dtype}")
    for mode in ("ddp", "fsdp"):
        other = weights(grid_workdir / f"{mode}_{stream_dtype}")
        assert other.keys() == single.keys()
        for name in single:
            assert torch.allclose(other[name], single[name], atol=2e-5, rtol=1e-4), (mode, name)
