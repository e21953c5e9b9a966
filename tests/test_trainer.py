"""The training scripts, launched for real in subprocesses (marked slow), judged by what they write; and the
run configuration, checked in-process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, env, launch, make_workdir, weights
from revformer.config import ConfigError, load_run_config

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def uninterrupted(workdir) -> Path:
    out = workdir / "full"
    launch("pretrain.py", workdir, "--config", "tiny.yaml", "--train.output_dir", str(out),
           "--train.report_to", "wandb", "--train.eval_every", "4", "--train.reconstruction_check_every", "4")
    return out


@slow
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


@slow
def test_stop_and_resume_equals_uninterrupted_even_past_a_truncated_checkpoint(workdir, uninterrupted):
    out = workdir / "resumed"
    common = ["--config", "tiny.yaml", "--train.output_dir", str(out), "--train.checkpoint_every", "4",
              "--train.keep_checkpoints", "3"]
    first = launch("pretrain.py", workdir, *common, "--train.stop_after_steps", "11")
    # The tied LM head is left out of checkpoints quietly (it is the embedding), not by accelerate's warning.
    assert "Removed shared tensor" not in first.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] and not (out / "model").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004", "step_0000008", "step_0000011"]
    damaged = out / "checkpoints" / "step_0000011" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a crash or full disk mid-write
    result = launch("pretrain.py", workdir, *common, "--train.resume_from_checkpoint", "latest")
    assert "step_0000011 is damaged" in result.stderr and "Traceback" not in result.stderr
    assert "resuming from" in result.stderr and "step_0000008" in result.stderr
    resumed, full = weights(out), weights(uninterrupted)
    assert resumed.keys() == full.keys()
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


@slow
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


@slow
def test_finetune_from_saved_folder(workdir, uninterrupted):
    # The README's example: a small folder of the user's texts, 5% held out (too few files to hold out whole).
    texts = workdir / "my_texts"
    texts.mkdir()
    for name in ("heapq.py", "bisect.py"):
        (texts / f"{name}.txt").write_text((workdir / "corpus" / f"{name}.txt").read_text())
    out = workdir / "finetuned"
    result = launch("finetune.py", workdir, "--config", "tiny.yaml", "--train.init_from", str(uninterrupted / "model"),
                    "--data.dataset", str(texts), "--data.validation_fraction", "0.05",
                    "--train.output_dir", str(out), "--train.max_steps", "3", "--train.learning_rate", "1e-3")
    assert "too few to hold out whole ones" in result.stderr
    start, end = weights(uninterrupted), weights(out)
    assert any(not torch.equal(start[k], end[k]) for k in start)  # it trained
    assert (out / "model" / "tokenizer.json").read_text() == (uninterrupted / "model" / "tokenizer.json").read_text()
    metrics = json.loads(launch("evaluate.py", workdir, str(out / "model"), "--config", "tiny.yaml").stdout)
    assert metrics["eval/bpb"] > 0 and metrics["eval/loss"] < 5.0


@slow
def test_two_process_ddp_matches_one_process(workdir):
    # Dropout off: two processes draw their masks from two RNG streams, one process from one.
    common = ["--config", "tiny.yaml", "--model.hidden_dropout", "0.0", "--train.max_steps", "6"]
    launch("pretrain.py", workdir, *common, "--train.output_dir", str(workdir / "single"))
    result = launch("pretrain.py", workdir, *common, "--train.output_dir", str(workdir / "ddp"),
                    "--train.checkpoint_every", "3", processes=2)
    assert result.stdout.count("final:") == 1  # one main process, not two independent runs
    assert "Removed shared tensor" not in result.stderr  # DDP's `module.` keys: the tied head still left out
    assert "lm_head.weight" not in load_file(workdir / "ddp" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert "2 process(es), MULTI_CPU" in result.stdout
    ddp, single = weights(workdir / "ddp"), weights(workdir / "single")
    for name in single:
        assert torch.allclose(ddp[name], single[name], atol=2e-5, rtol=1e-4), name


@slow
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


@slow
def test_sigterm_checkpoints_and_the_resumed_run_is_exact(workdir, uninterrupted):
    out = workdir / "preempted"
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", "tiny.yaml", "--train.output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "train_config.yaml").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # as a cluster does when it preempts a job
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("_")[1]) < 16, checkpoints
    assert f"at step {int(checkpoints[0].name.split('_')[1])}: saved the checkpoint {checkpoints[0]};" in stdout
    assert not (out / "model").exists()
    launch("pretrain.py", workdir, "--config", "tiny.yaml", "--train.output_dir", str(out),
           "--train.resume_from_checkpoint", "latest")
    resumed, full = weights(out), weights(uninterrupted)
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


def alive(process) -> bool:
    """Whether a psutil process still runs (an exited child that its parent has not reaped yet does not)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def preempted_run(work: Path, out: Path, *args: str, script: str | None = None, preempt: bool = True
                  ) -> tuple[str, str, Path]:
    """Start a tiny run and, with `preempt`, SIGTERM it once training is set up, as a scheduler's preemption does;
    it must end cleanly. Returns (stdout, stderr, the one checkpoint it wrote). With wandb (`args`), the service
    process is stopped first."""
    import psutil

    cmd = [sys.executable, script or str(ROOT / "scripts" / "pretrain.py"), "--config", "tiny.yaml",
           "--train.output_dir", str(out), "--train.max_steps", "100000", "--train.checkpoint_every", "100000", *args]
    proc = subprocess.Popen(cmd, cwd=work, env=env(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "train_config.yaml").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if preempt:
        # The scheduler signals every process of the job. wandb's service process (wandb-core) has its own session,
        # so it is signalled by pid; it goes first, so the trainer finds it gone at the latest when it ends wandb.
        services = psutil.Process(proc.pid).children(recursive=True)
        for service in services:
            service.terminate()
        while any(alive(service) for service in services):
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1, checkpoints
    return stdout, stderr, checkpoints[0]


@slow
def test_preemption_that_stops_the_wandb_service_too_ends_cleanly_and_names_the_checkpoint(tmp_path):
    work = make_workdir(tmp_path)
    out = work / "out"
    # No logging before the stop (log_every is past the end): the lost service is met where the run ends wandb.
    stdout, stderr, saved = preempted_run(work, out, "--train.report_to", "wandb", "--train.log_every", "100000")
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # wandb was running (offline) before the stop
    step = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert f"Stopped on request at step {step}: saved the checkpoint {saved};" in stdout
    lost = [line for line in stderr.splitlines() if "lost its service process" in line]
    expected = ("warning: the wandb tracker lost its service process (ConnectionResetError: Connection lost); it is "
                "closed, and nothing more is logged to it.")
    assert lost == [expected], stderr[-3000:]
    assert "Exception ignored" not in stderr  # wandb's exit-time teardown does not report the lost connection


LOST_TRACKER = '''
import os, signal
from accelerate.tracking import GeneralTracker
import revformer.trainer as trainer


class LostServiceTracker(GeneralTracker):
    """A tracker whose service process a preemption stops with the trainer: the SIGTERM (sent here, at the first
    log) comes while the trainer logs, and every call finds the connection gone, as wandb's do then."""

    name = "lost_service"
    requires_logging_directory = False
    tracker = None

    def log(self, values, step=None, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise ConnectionResetError("Connection lost")

    def finish(self):
        raise ConnectionResetError("Connection lost")


trainer.configure_tracking = lambda run: [LostServiceTracker()]
trainer.main()
'''


@slow
def test_a_tracker_lost_mid_run_neither_ends_the_run_nor_costs_the_checkpoint(tmp_path):
    work = make_workdir(tmp_path)
    (work / "lost_tracker_run.py").write_text(LOST_TRACKER)
    stdout, stderr, saved = preempted_run(work, work / "out", "--train.log_every", "1",
                                          script=str(work / "lost_tracker_run.py"), preempt=False)
    assert saved.name == "step_0000001"  # the step whose log met the lost service
    assert f"Stopped on request at step 1: saved the checkpoint {saved};" in stdout
    assert stderr.count("lost its service process") == 1, stderr[-3000:]  # dropped at once; never finished


@slow
def test_divergence_keeps_the_last_finite_checkpoint_and_its_advice_works(workdir):
    out = workdir / "diverged"
    common = ["--config", "tiny.yaml", "--train.output_dir", str(out), "--train.checkpoint_every", "4"]
    launch("pretrain.py", workdir, *common, "--train.stop_after_steps", "4")
    # The same run resumed with an absurd learning rate: the update of step 5 blows the weights up.
    result = launch("pretrain.py", workdir, *common, "--train.resume_from_checkpoint", "latest",
                    "--train.learning_rate", "1e30", "--train.max_grad_norm", "null", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Non-finite" in result.stderr and "before applying that update" in result.stderr
    last = out / "checkpoints" / "step_0000004"
    assert sorted((out / "checkpoints").iterdir()) == [last]  # nothing written from the diverged state
    assert f"--train.resume_from_checkpoint {last}" in result.stderr
    assert all(torch.isfinite(t).all() for t in load_file(last / "model.safetensors").values())
    # The advice, followed: resume from that checkpoint with a lower learning rate, and the run completes.
    done = launch("pretrain.py", workdir, *common, "--train.resume_from_checkpoint", str(last),
                  "--train.learning_rate", "2e-3")
    assert "Peak learning rate 1e+30 -> 0.002" not in done.stdout  # the checkpoint held the original 5e-3
    assert "Peak learning rate 0.005 -> 0.002" in done.stdout
    results = json.loads((out / "model" / "eval_results.json").read_text())
    assert results["step"] == 16 and results["eval/loss"] < 4.5


@slow
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


# ----------------------------------------------------------------------------- configuration


def test_string_overrides_keep_the_text_typed(workdir):
    run = load_run_config(workdir / "tiny.yaml", ["--train.output_dir", "nan", "--train.project_name", "yes",
                                                  "--train.run_name", "1e3", "--train.hub_model_id", "null",
                                                  "--train.mixed_precision", "no", "--data.dataset_config", "null"])
    assert run.train.output_dir == "nan" and run.train.project_name == "yes" and run.train.run_name == "1e3"
    assert run.train.hub_model_id is None  # optional: null still unsets it
    assert run.train.mixed_precision == "no" and run.data.dataset_config is None
    run = load_run_config(workdir / "tiny.yaml", ["--train.learning_rate", "1e3", "--train.eval_batches", "null"])
    assert run.train.learning_rate == 1000.0 and run.train.eval_batches is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.num_attention_heads", "5"], "must be divisible by num_attention_heads"),
        (["--train.eval_every", "0"], "train.eval_every must be >= 1"),
        (["--train.warmup_steps", "-1"], "train.warmup_steps must be >= 0"),
        (["--train.min_lr_ratio", "-0.5"], "train.min_lr_ratio must be in [0, 1]"),
        (["--train.warmup_steps", "20"], "warmup_steps=20 is not shorter than train.max_steps=16"),
        (["--data.block_size", "512"], "exceeds the model's max_position_embeddings=128"),
    ],
)
def test_whole_run_is_validated_at_load(workdir, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(workdir / "tiny.yaml", overrides)


@slow
def test_invalid_run_fails_before_any_tokenizing(tmp_path):
    work = make_workdir(tmp_path)
    result = launch("pretrain.py", work, "--config", "tiny.yaml", "--model.hidden_size", "30", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "hidden_size (30) must be divisible by num_attention_heads (4)" in result.stderr
    assert "Tokenizing" not in result.stderr and not (work / "hf_cache").exists()


def test_help_lists_every_section_and_key_with_defaults(capsys):
    helps = {}
    for script in ("pretrain.py", "finetune.py", "evaluate.py"):
        code, out, err = run_script_in_process(script, ["--help"], capsys)
        assert code == 0, err
        helps[script] = out
        for line in ("--train.max_steps int [1000]", "--data.block_size int [1024]", "--model.hidden_size int [512]",
                     "--train.mixed_precision"):
            assert line in out, (script, line)
    finetune = " ".join(helps["finetune.py"].split())
    assert "--train.init_from PATH_OR_HUB_ID (a save_pretrained folder) is required" in finetune


# ----------------------------------------------------------------------------- evaluation


@slow
def test_evaluate_script_reports_the_trainers_final_number(uninterrupted, workdir):
    final = json.loads((uninterrupted / "model" / "eval_results.json").read_text())
    assert final["eval/train_loss"] > 0  # both losses on the same footing
    # No --config: the run's own train_config.yaml beside the model names the data. A fresh datasets cache, so
    # what gets tokenized shows: the validation split only, never the training split.
    fresh = {**env(workdir), "HF_DATASETS_CACHE": str(workdir / "fresh_cache")}
    scored = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(uninterrupted / "model")],
                            capture_output=True, text=True, cwd=workdir, env=fresh, timeout=600)
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = json.loads(scored.stdout)
    for key in ("eval/loss", "eval/bpb"):
        assert metrics[key] == pytest.approx(final[key], rel=1e-9), key
    assert "validation split held out" in scored.stderr
    assert scored.stderr.count("Tokenizing:   0%") == 1, scored.stderr


@slow
def test_evaluate_script_scores_a_named_file_folder_or_split(uninterrupted, workdir):
    test_dir = workdir / "with_splits"
    (test_dir / "test").mkdir(parents=True)
    (test_dir / "train.txt").write_text("x = 1\n" * 200)
    (test_dir / "test" / "a.txt").write_text("def f(a, b):\n    return a + b\n" * 40)
    model = str(uninterrupted / "model")
    one_file = json.loads(launch("evaluate.py", workdir, model, "--data.dataset",
                                 str(test_dir / "test" / "a.txt")).stdout)
    split = json.loads(launch("evaluate.py", workdir, model, "--data.dataset", str(test_dir),
                              "--data.validation_split", "test").stdout)
    assert one_file == split  # the same text, named two ways
    assert one_file["eval/loss"] > 0 and one_file["eval/bpb"] > 0
    # A folder and a validation_fraction: the documents training would hold out, not all of them.
    folder = workdir / "no_splits"
    folder.mkdir()
    for i in range(10):
        (folder / f"doc{i}.txt").write_text(f"def f{i}(a):\n    return a * {i}\n" * (30 + 7 * i))
    whole = launch("evaluate.py", workdir, model, "--data.dataset", str(folder))
    held_out = launch("evaluate.py", workdir, model, "--data.dataset", str(folder),
                      "--data.validation_fraction", "0.2")
    assert "scored: all of" in whole.stderr
    assert "held out from" in held_out.stderr and "validation_fraction=0.2" in held_out.stderr
    blocks = [int(re.search(r"; (\d+) blocks of", r.stderr).group(1)) for r in (whole, held_out)]
    assert 0 < blocks[1] < blocks[0] / 2, blocks
    sampled = launch("evaluate.py", workdir, model, "--eval_batches", "1", "--train.batch_size", "2")
    assert "a fixed random sample of 1 batches" in sampled.stderr  # honoured, not silently ignored


def run_script_in_process(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """`scripts/<script> argv` in this process (for what ends before any training: --help, refused options)."""
    import runpy

    old = sys.argv
    sys.argv = [script, *argv]
    try:
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_evaluate_script_refuses_options_it_does_not_use(capsys):
    code, _, err = run_script_in_process("evaluate.py", ["some/model", "--train.max_steps", "5"], capsys)
    assert code != 0 and "evaluate.py does not use --train.max_steps" in err
    code, _, err = run_script_in_process("evaluate.py", ["some/model", "--model.hidden_size", "64"], capsys)
    assert code != 0 and "evaluate.py does not use --model.hidden_size" in err


# ----------------------------------------------------------------------------- recoverable failures


@slow
def test_streamed_dataset_resumes_in_a_later_epoch(tmp_path):
    work = make_workdir(tmp_path)
    (work / "small.txt").write_text((ROOT / "revformer" / "config.py").read_text()[:2600])
    common = ["--config", "tiny.yaml", "--data.dataset", str(work / "small.txt"), "--data.streaming", "true",
              "--train.max_steps", "16"]  # about 8 batches per epoch: the run reads the stream twice
    launch("pretrain.py", work, *common, "--train.output_dir", str(work / "full"))
    launch("pretrain.py", work, *common, "--train.output_dir", str(work / "resumed"), "--train.stop_after_steps", "11")
    state = json.loads((work / "resumed" / "checkpoints" / "step_0000011" / "trainer_state.json").read_text())
    assert state["epoch"] >= 1, state  # stopped after the stream was read once through
    launch("pretrain.py", work, *common, "--train.output_dir", str(work / "resumed"),
           "--train.resume_from_checkpoint", "latest")
    resumed, full = weights(work / "resumed"), weights(work / "full")
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


FAKE_HUB = '''
import json, os, sys
import huggingface_hub

LOG, MODE = os.environ["FAKE_HUB_LOG"], os.environ["FAKE_HUB_MODE"]


def record(*event):
    with open(LOG, "a") as f:
        f.write(json.dumps(event) + "\\n")


class FakeHfApi:
    """HfApi as a network outage or a missing login presents it."""

    def __init__(self, *args, **kwargs):
        pass

    def whoami(self):
        if MODE == "logged_out":
            raise OSError("Invalid user token.")
        return {"name": "tester"}

    def create_repo(self, repo_id, private=True, exist_ok=True, **kwargs):
        if MODE == "no_access":
            raise PermissionError("403 Forbidden: you cannot create a repo in this namespace")
        record("create", repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message, **kwargs):
        record("upload", repo_id, sorted(os.listdir(folder_path)), commit_message)
        raise ConnectionError("Network is unreachable")


huggingface_hub.HfApi = FakeHfApi
import revformer.trainer as trainer

trainer.HUB_RETRY_DELAYS = (0.0, 0.0)  # two retries, no waiting
trainer.main()
'''


@slow
@pytest.mark.parametrize("mode", ["logged_out", "no_access"])
def test_hub_access_is_checked_before_training(tmp_path, mode):
    work = make_workdir(tmp_path)
    (work / "fake_hub_run.py").write_text(FAKE_HUB)
    cmd = [sys.executable, "fake_hub_run.py", "--config", "tiny.yaml", "--train.push_to_hub", "true",
           "--train.hub_model_id", "me/tiny", "--train.output_dir", str(work / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=600,
                            env={**env(work), "FAKE_HUB_LOG": str(work / "hub.log"), "FAKE_HUB_MODE": mode})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("huggingface-cli login" if mode == "logged_out" else "Cannot create or write to") in result.stderr
    assert "Tokenizing" not in result.stderr and not (work / "out" / "train_config.yaml").exists()


@slow
def test_failed_hub_pushes_never_stop_training(tmp_path):
    work = make_workdir(tmp_path)
    (work / "fake_hub_run.py").write_text(FAKE_HUB)
    log = work / "hub.log"
    cmd = [sys.executable, "fake_hub_run.py", "--config", "tiny.yaml", "--train.push_to_hub", "true",
           "--train.hub_model_id", "me/tiny", "--train.save_pretrained_with_checkpoints", "true",
           "--train.checkpoint_every", "4", "--train.max_steps", "8", "--train.output_dir", str(work / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=600,
                            env={**env(work), "FAKE_HUB_LOG": str(log), "FAKE_HUB_MODE": "down"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "out" / "model" / "model.safetensors").exists()  # training went on to the end
    uploads = [json.loads(line) for line in log.read_text().splitlines() if '"upload"' in line]
    messages = [u[3] for u in uploads]
    # Checkpoint pushes in the background and the final push: each tried three times (two retries).
    assert messages.count("checkpoint at step 4") == 3 and messages.count("checkpoint at step 8") == 3
    assert sum(m.startswith("revformer: 8 steps") for m in messages) == 3
    assert {"model.safetensors", "config.json", "modeling_revformer.py"} <= set(uploads[-1][2])
    assert f"The model folder {work / 'out' / 'model'} is complete; push it later with" in result.stderr
    assert "huggingface-cli upload me/tiny" in result.stderr


# ----------------------------------------------------------------------------- FSDP2 model folder


@slow
def test_fsdp_final_folder_holds_revformer_code_and_loads_remotely(workdir):
    out = workdir / "fsdp_folder"
    launch("pretrain.py", workdir, "--config", "tiny.yaml", "--model.hidden_dropout", "0.0", "--train.max_steps", "3",
           "--train.output_dir", str(out), processes=2, accelerate_config="fsdp_cpu.yaml")
    folder = out / "model"
    names = {p.name for p in folder.iterdir()}
    assert {"modeling_revformer.py", "configuration_revformer.py", "reversible.py", "attention.py"} <= names
    assert not any(n.startswith("_fsdp") for n in names), names
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["RevformerForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("modeling_revformer.RevformerForCausalLM")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["revformer"] = None  # as where revformer is not installed
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print("ok", type(model).__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 0 and "ok RevformerForCausalLM" in result.stdout, result.stderr[-3000:]


def test_logged_loss_is_the_mean_over_the_logging_window():
    """The bar and the trackers show the mean of the window's step losses, not the last batch's."""
    from types import SimpleNamespace

    from revformer.trainer import log_window

    logged, postfix = {}, {}
    accelerator = SimpleNamespace(reduce=lambda t, op: t, device=torch.device("cpu"),
                                  log=lambda logs, step: logged.update(logs))
    run = load_run_config(None, ["--data.block_size", "64"])
    session = SimpleNamespace(accelerator=accelerator, run=run, step=30,
                              scheduler=SimpleNamespace(get_last_lr=lambda: [1e-3]))
    step_losses = [4.0, 3.0, 8.0]  # the last batch alone would say 8.0
    window = {"start": time.perf_counter(), "steps": 3, "loss": torch.tensor(sum(step_losses))}
    log_window(session, window, 0.5, SimpleNamespace(set_postfix=lambda **kw: postfix.update(kw)))
    assert logged["train/loss"] == pytest.approx(5.0) and postfix["loss"] == "5.000"


def test_a_gloo_teardown_first_lets_the_worker_threads_settle(monkeypatch):
    """gloo's worker threads free a finished collective's tensors with the GIL; tearing the process group down (its
    destructor joins them holding the GIL) while one still does deadlocked a rank after a complete two-process run."""
    from types import SimpleNamespace

    from revformer import trainer

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(trainer.time, "sleep", lambda seconds: calls.append(("sleep", seconds)))
    accelerator = SimpleNamespace(num_processes=2, trackers=[], end_training=lambda: calls.append(("teardown",)))
    trainer.end_training(accelerator)
    assert calls == [("sleep", trainer.GLOO_SETTLE_S), ("teardown",)]
    calls.clear()
    accelerator.num_processes = 1  # one process: no process group, nothing to wait for
    trainer.end_training(accelerator)
    assert calls == [("teardown",)]
