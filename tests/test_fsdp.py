"""Sharded training with FSDP2 through accelerate, for real: two CPU processes over gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import launch, make_workdir, weights

pytestmark = pytest.mark.slow
# Dropout off (two processes draw masks from two RNG streams); accumulation on, so no_sync-style accumulation
# under FSDP is exercised too.
COMMON = ["--config", "tiny.yaml", "--model.hidden_dropout", "0.0", "--train.max_steps", "6",
          "--train.gradient_accumulation_steps", "2", "--train.checkpoint_every", "100"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("fsdp"))


def fsdp(workdir: Path, out: str, *args: str):
    result = launch("pretrain.py", workdir, *COMMON, "--train.output_dir", str(workdir / out), *args,
                    processes=2, accelerate_config="fsdp_cpu.yaml")
    assert "2 process(es), FSDP" in result.stdout
    return result


@pytest.mark.parametrize("reversible", ["true", "false"])
def test_fsdp_two_processes_match_one_unsharded_process(workdir, reversible):
    launch("pretrain.py", workdir, *COMMON, "--model.reversible", reversible,
           "--train.output_dir", str(workdir / f"single_{reversible}"))
    fsdp(workdir, f"fsdp_{reversible}", "--model.reversible", reversible)
    sharded, single = weights(workdir / f"fsdp_{reversible}"), weights(workdir / f"single_{reversible}")
    assert sharded.keys() == single.keys()
    for name in single:
        assert torch.allclose(sharded[name], single[name], atol=2e-5, rtol=1e-4), name


def test_fsdp_stop_and_resume_equals_uninterrupted(workdir):
    fsdp(workdir, "fsdp_full")
    fsdp(workdir, "fsdp_resumed", "--train.stop_after_steps", "3")
    assert (workdir / "fsdp_resumed" / "checkpoints" / "step_0000003" / "pytorch_model_fsdp_0").is_dir()
    fsdp(workdir, "fsdp_resumed", "--train.resume_from_checkpoint", "latest")
    full, resumed = weights(workdir / "fsdp_full"), weights(workdir / "fsdp_resumed")
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


def test_fsdp_saved_weights_load_and_give_the_trained_logits(workdir):
    if not (workdir / "fsdp_true" / "model").exists():
        pytest.skip("needs the FSDP run of test_fsdp_two_processes_match_one_unsharded_process")
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    sharded = AutoModelForCausalLM.from_pretrained(workdir / "fsdp_true" / "model").eval()
    single = AutoModelForCausalLM.from_pretrained(workdir / "single_true" / "model").eval()
    with torch.no_grad():
        assert torch.allclose(sharded(ids).logits, single(ids).logits, atol=1e-4)
