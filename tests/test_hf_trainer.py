"""transformers' Trainer trains RevformerForCausalLM unchanged, on one process and on two (DDP over gloo), with the
default coupling and, on two processes, with bdia (what convert.py makes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "hf_trainer_run.py"
pytestmark = pytest.mark.slow


def run(cmd: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((tmp_path / "result.json").read_text())


def test_trainer_single_process(tmp_path):
    result = run([sys.executable, str(SCRIPT), str(tmp_path)], tmp_path)
    losses = result["losses"]
    assert result["world_size"] == 1 and len(losses) == 20
    assert all(map(lambda x: x == x, losses))  # no NaN
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("coupling", ["sublayer", "bdia"])  # bdia: each rank draws its own gammas
def test_trainer_two_processes_with_default_ddp_settings(tmp_path, coupling):
    port = str(29600 + os.getpid() % 500 + (coupling == "bdia"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(SCRIPT), str(tmp_path), coupling]
    result = run(cmd, tmp_path)
    assert result["world_size"] == 2
    # Trainer's default for a model without gradient checkpointing: the setting that breaks nested-backward engines.
    assert result["find_unused_parameters"] is True
    losses = result["losses"]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    rank0, rank1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
