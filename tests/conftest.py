"""Shared fixtures: tiny configs and a self-contained byte-level tokenizer (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from revformer import RevformerConfig
from revformer.attention import ATTENTION_FUNCTIONS, dense_attention, eager_attention

ROOT = Path(__file__).resolve().parents[1]


def dense_kernel(implementation: str):
    """The dense path of a `full` layer (`dense_attention` over revformer's eager attention or transformers' sdpa),
    with the linear-memory kernels' signature, so that every kernel is tested against the same references."""
    from types import SimpleNamespace

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = eager_attention if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]

    def kernel(q, k, v, *, key_padding_mask, dropout_p, scale, config):
        module = SimpleNamespace(is_causal=True, num_key_value_groups=q.shape[1] // k.shape[1])
        out, _ = dense_attention(interface, module, q, k, v, kind="full", key_padding_mask=key_padding_mask,
                                 document_ids=None, dropout_p=dropout_p, scale=scale, config=config)
        return out.transpose(1, 2)  # (B, Tq, H, D) -> (B, H, Tq, D)

    return kernel


# Every attention kernel by the name the tests use: `eager` and `full` (sdpa) are the dense path that `full` layers
# run, `local` and `lsh` the linear-memory kernels.
KERNELS = {"eager": dense_kernel("eager"), "full": dense_kernel("sdpa"), **ATTENTION_FUNCTIONS}


def end_process_group() -> None:
    """Tear a multi-process gloo group down as the trainer does: a worker thread still freeing a finished collective's
    tensors needs the GIL, which the group's destructor holds while it joins the workers (a SIGABRT at exit), so
    they get `GLOO_SETTLE_S` to go idle first."""
    import torch.distributed as dist

    from revformer.trainer import GLOO_SETTLE_S

    time.sleep(GLOO_SETTLE_S)
    dist.destroy_process_group()


def tiny_config(**overrides) -> RevformerConfig:
    """A model small enough for many CPU runs per test."""
    defaults = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    defaults.update(overrides)
    return RevformerConfig(**defaults)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the gradient error measure used throughout the tests."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + <pad>, <s>, </s>) built in memory, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# ---------------------------------------------------------------- launching the real training scripts


def env(tmp: Path, threads: int = 2) -> dict[str, str]:
    """Offline, isolated, deterministic environment for a training subprocess."""
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HF_DATASETS_CACHE": str(tmp / "hf_cache"),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONHASHSEED": "0",
    }


def launch(
    script: str, tmp: Path, *args: str, processes: int = 1, check: bool = True, accelerate_config: str = "cpu_ddp.yaml"
) -> subprocess.CompletedProcess:
    """Run `scripts/<script>` in `tmp`: plainly for one process, through `accelerate launch` for several."""
    if processes == 1:
        cmd = [sys.executable, str(ROOT / "scripts" / script)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate" / accelerate_config), "--num_processes", str(processes),
               "--main_process_port", str(29500 + os.getpid() % 1000), str(ROOT / "scripts" / script)]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=tmp,
                            env=env(tmp, threads=2 // processes or 1), timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def make_workdir(tmp: Path) -> Path:
    """A small real corpus (slices of stdlib modules) and a tiny run config `tiny.yaml` in `tmp`."""
    corpus = tmp / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/decoder.py", "json/encoder.py", "csv.py", "textwrap.py", "shlex.py", "glob.py",
                 "fnmatch.py", "heapq.py", "bisect.py", "colorsys.py", "keyword.py", "string.py"):
        (corpus / (name.replace("/", "_") + ".txt")).write_text((stdlib / name).read_text()[:6000])
    config = {
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "max_position_embeddings": 128, "hidden_dropout": 0.1},
        "data": {"dataset": str(corpus), "tokenizer": "byte", "block_size": 64, "validation_fraction": 0.2},
        "train": {"batch_size": 4, "max_steps": 16, "learning_rate": 5e-3, "warmup_steps": 2, "eval_every": 100,
                  "eval_batches": 4, "log_every": 2, "checkpoint_every": 100, "report_to": "none"},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(config))
    return tmp


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The final saved weights of a run."""
    return load_file(folder / "model" / "model.safetensors")


# ---------------------------------------------------------------------------------- launching the benchmarks


def run_benchmark(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the benchmark suite `python -m benchmarks SUITE` from the checkout on one thread; it must succeed."""
    bench_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "benchmarks", script, *args], capture_output=True, text=True,
                            env=bench_env, cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_jsonl(path: Path) -> list[dict]:
    """The records of a benchmark's JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
