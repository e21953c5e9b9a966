"""The training scripts, launched for real in subprocesses, judged by what they write."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, env, launch, make_workdir, weights
from revformer.config import ConfigError, load_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def uninterrupted(workdir) -> Path:
    out = workdir / "full"
    launch("pretrain.py", workdir, "--config", "tiny.yaml", "--train.output_dir", str(out),
           "--train.report_to", "wandb", "--train.eval_every", "4", "--train.reconstruction_check_every", "4")
    return out


def test_pretraining_lowers_validation_loss_and_logs_to_wandb(uninterrupted):
    results = json.loads((uninterrupted / "model" / "eval_results.json").read_text())
    assert results["step"] == 16
    # An untrained byte-level model scores about ln(259) = 5.56 nats/token; training must beat it clearly.
    assert results["eval/loss"] < 4.5, results
    assert results["eval/bpb"] == pytest.approx(results["eval/loss"] / 0.6931471805599453, rel=0.05)
    runs = list((uninterrupted / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = next(runs[0].glob("*.wandb")).read_bytes()
    for key in (b"train/loss", b"train/lr", b"train/tokens_per_s", b"train/grad_norm", b"train/peak_memory_gib",
                b"train/reconstruction_error", b"eval/bpb"):
        assert key in history, key
    card = (uninterrupted / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "validation bpb" in card


def test_stop_and_resume_equals_uninterrupted(workdir, uninterrupted):
    out = workdir / "resumed"
    common = ["--config", "tiny.yaml", "--train.output_dir", str(out)]
    launch("pretrain.py", workdir, *common, "--train.stop_after_steps", "7")
    assert (out / "checkpoints" / "step_0000007" / "trainer_state.json").exists()
    assert not (out / "model").exists()
    launch("pretrain.py", workdir, *common, "--train.resume_from_checkpoint", "latest")
    resumed, full = weights(out), weights(uninterrupted)
    assert resumed.keys() == full.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


def test_saved_folder_loads_with_remote_code_and_generates(uninterrupted, workdir):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["revformer"] = None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder = {str(uninterrupted / "model")!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("import os", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 5
        print("ok", type(model).__module__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok transformers_modules" in result.stdout
    sample = launch("generate.py", workdir, str(uninterrupted / "model"), "--prompt", "def ", "--max_new_tokens", "10")
    assert sample.stdout.startswith("def ")


def test_finetune_from_saved_folder(workdir, uninterrupted):
    out = workdir / "finetuned"
    launch("finetune.py", workdir, "--config", "tiny.yaml", "--train.init_from", str(uninterrupted / "model"),
           "--train.output_dir", str(out), "--train.max_steps", "3", "--train.learning_rate", "1e-3")
    start, end = weights(uninterrupted), weights(out)
    assert any(not torch.equal(start[k], end[k]) for k in start)  # it trained
    assert (out / "model" / "tokenizer.json").read_text() == (uninterrupted / "model" / "tokenizer.json").read_text()
    metrics = json.loads(launch("evaluate.py", workdir, str(out / "model"), "--config", "tiny.yaml").stdout)
    assert metrics["eval/bpb"] > 0 and metrics["eval/loss"] < 5.0


def test_two_process_ddp_matches_one_process(workdir):
    # Dropout off: two processes draw their masks from two RNG streams, one process from one.
    common = ["--config", "tiny.yaml", "--model.hidden_dropout", "0.0", "--train.max_steps", "6"]
    launch("pretrain.py", workdir, *common, "--train.output_dir", str(workdir / "single"))
    result = launch("pretrain.py", workdir, *common, "--train.output_dir", str(workdir / "ddp"), processes=2)
    assert result.stdout.count("final:") == 1  # one main process, not two independent runs
    assert "2 process(es), MULTI_CPU" in result.stdout
    ddp, single = weights(workdir / "ddp"), weights(workdir / "single")
    for name in single:
        assert torch.allclose(ddp[name], single[name], atol=2e-5, rtol=1e-4), name


def test_bad_config_fails_clearly(workdir):
    result = launch("pretrain.py", workdir, "--config", "tiny.yaml", "--train.max_stepz", "3", check=False)
    assert result.returncode != 0
    assert "Unknown key 'train.max_stepz'. Did you mean 'train.max_steps'?" in result.stderr
    result = launch("pretrain.py", workdir, "--config", "tiny.yaml", "--data.dataset", "/no/such/corpus", check=False)
    assert result.returncode != 0 and "/no/such/corpus" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.learning_rate", "fast"], "'train.learning_rate' must be float"),
        (["--model.hidden_sise", "64"], "Did you mean 'model.hidden_size'"),
        (["--model.num_hidden_layers", "2.5"], "'model.num_hidden_layers' must be int"),
        (["--train.mixed_precision", "fp8"], "'train.mixed_precision' must be"),
        (["--optim.lr", "1"], "Unknown section"),
        (["--train.push_to_hub", "true"], "hub_model_id is not set"),
    ],
)
def test_config_errors_name_the_key(workdir, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_run_config(workdir / "tiny.yaml", overrides)


def test_overrides_are_typed(workdir):
    run = load_run_config(workdir / "tiny.yaml", ["--train.learning_rate", "1e-4", "--max_steps=5",
                                                  "--model.attention_layers", "[local, lsh]"])
    assert run.train.learning_rate == 1e-4 and run.train.max_steps == 5
    assert run.model_config(vocab_size=300).attention_layers == ["local", "lsh"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_recipe_parses_into_a_valid_model(recipe):
    run = load_run_config(ROOT / "configs" / recipe)
    config = run.model_config(vocab_size=512)
    assert config.max_position_embeddings >= run.data.block_size


def test_sigterm_checkpoints_and_the_resumed_run_is_exact(workdir, uninterrupted):
    out = workdir / "preempted"
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", "tiny.yaml", "--train.output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "train_config.yaml").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # as a cluster does when it preempts a job
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("_")[1]) < 16, checkpoints
    assert not (out / "model").exists()
    launch("pretrain.py", workdir, "--config", "tiny.yaml", "--train.output_dir", str(out),
           "--train.resume_from_checkpoint", "latest")
    resumed, full = weights(out), weights(uninterrupted)
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


def test_non_finite_loss_stops_with_a_checkpoint_of_the_last_good_state(workdir):
    out = workdir / "diverged"
    result = launch("pretrain.py", workdir, "--config", "tiny.yaml", "--train.output_dir", str(out),
                    "--train.learning_rate", "1e30", "--train.max_grad_norm", "null", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Non-finite loss" in result.stderr and "resume_from_checkpoint" in result.stderr
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and str(checkpoints[0]) in result.stderr
    assert not (out / "model").exists()


def test_push_to_hub_uploads_the_saved_folder(monkeypatch, uninterrupted, workdir):
    import huggingface_hub

    from revformer.trainer import push_folder

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, private, exist_ok: calls.setdefault("create", (repo_id, private)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, repo_id, folder_path, commit_message: calls.setdefault("upload", (repo_id, folder_path)))
    run = load_run_config(workdir / "tiny.yaml", ["--train.push_to_hub", "true", "--train.hub_model_id", "me/tiny"])
    push_folder(uninterrupted / "model", run, "test")
    assert calls["create"] == ("me/tiny", True)
    repo_id, folder = calls["upload"]
    files = {p.name for p in Path(folder).iterdir()}
    # Everything a trust_remote_code user needs: weights, config with auto_map, code, tokenizer, card.
    assert {"model.safetensors", "config.json", "modeling_revformer.py", "reversible.py", "attention.py",
            "configuration_revformer.py", "tokenizer.json", "README.md"} <= files
    assert "auto_map" in json.loads((Path(folder) / "config.json").read_text())
