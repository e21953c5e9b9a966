"""Export: a bdia model saved as the Llama / Mistral / Qwen2 / Qwen3 folder it computes out of training. (A converted
model fine-tuned through scripts/finetune.py with train.export_source, its export loaded without revformer: in
test_conversion.py, on the fine-tuning run that file already makes.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_workdir, relative_error, tiny_config
from test_conversion import FAMILIES, source_model
from transformers import AutoModelForCausalLM

from revformer import RevformerForCausalLM, convert_model
from revformer.export import ExportError, export_model

# Config values the export writes afresh rather than copying: save_pretrained records the class it saved
# (`architectures`) and the dtype of the tensors it wrote (`dtype`); an in-memory source has neither.
WRITTEN_BY_SAVE = {"architectures", "dtype"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_source_convert_export_gives_back_every_tensor_and_config_value(family, tmp_path):
    source = source_model(family)
    out = export_model(convert_model(source), tmp_path / "export")
    assert not list(out.glob("*.py")) and "auto_map" not in json.loads((out / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert type(exported) is type(source)
    expected, got = source.state_dict(), exported.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:  # bit for bit, same dtype
        assert expected[name].dtype == got[name].dtype and torch.equal(expected[name], got[name]), name
    want, have = source.config.to_diff_dict(), exported.config.to_diff_dict()
    differ = {k for k in want.keys() | have.keys() if want.get(k) != have.get(k)}
    assert differ <= WRITTEN_BY_SAVE, {k: (want.get(k), have.get(k)) for k in differ}
    assert exported.config.tie_word_embeddings == source.config.tie_word_embeddings
    assert (exported.lm_head.weight is exported.model.embed_tokens.weight) == source.config.tie_word_embeddings


def greedy(model, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize(("options", "architecture"), [
    ({}, "LlamaForCausalLM"),
    ({"num_key_value_heads": 2, "qk_norm": True}, "Qwen3ForCausalLM"),
    ({"qkv_bias": True, "tie_word_embeddings": False}, "Qwen2ForCausalLM"),
])
def test_a_bdia_model_trained_from_scratch_exports_and_computes_the_same(options, architecture, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(coupling="bdia", stream_dtype="fixed_point", bdia_gamma=0.25, **options)
    model = RevformerForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # trained through the reversible engine, so norms and biases move off their init
        model(torch.randint(3, 128, (2, 24)), labels=torch.randint(3, 128, (2, 24))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    out = export_model(model, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == architecture
    ids = torch.randint(3, 128, (2, 20))
    with torch.no_grad():
        assert relative_error(exported(ids).logits, model(ids).logits) < 1e-5
    prompt = ids[:1, :6]
    expected = greedy(model, prompt, use_cache=True)
    assert torch.equal(greedy(exported, prompt, use_cache=True), expected)
    assert torch.equal(greedy(exported, prompt, use_cache=False), expected)
    # In another dtype on request, with the config saying so.
    half = export_model(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(half).model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(("options", "reason"), [
    ({"coupling": "sublayer"}, "its coupling is 'sublayer'"),
    ({"coupling": "bdia", "attention_layers": ["full", "lsh"]}, "attention_layers include ['lsh']"),
    ({"coupling": "bdia", "attention_layers": "local"}, "attention_layers include ['local']"),
    ({"coupling": "bdia", "stream_dtype": "fixed_point", "stream_fraction_bits": 12}, "2^-12"),
    ({"coupling": "bdia", "qk_norm": True, "qkv_bias": True}, "which Qwen3 does not have"),
])
def test_a_model_no_standard_architecture_computes_is_refused_with_the_reason(options, reason, tmp_path):
    model = RevformerForCausalLM(tiny_config(**options))
    with pytest.raises(ExportError, match="Cannot export") as err:
        export_model(model, tmp_path / "export")
    assert reason in str(err.value) and "Exportable: a `bdia` model" in str(err.value)
    assert not (tmp_path / "export").exists()


def test_the_export_script_refuses_a_sublayer_model_in_one_line(tmp_path):
    RevformerForCausalLM(tiny_config()).save_pretrained(tmp_path / "rev")
    script = str(ROOT / "scripts/export.py")
    done = subprocess.run([sys.executable, script, str(tmp_path / "rev"), str(tmp_path / "out")],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "error: Cannot export" in done.stderr and "'sublayer'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_push_to_hub_uploads_the_export(monkeypatch, tmp_path):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, private, exist_ok: calls.setdefault("create", (repo_id, private)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, repo_id, folder_path, commit_message:
                        calls.setdefault("upload", (repo_id, sorted(p.name for p in (tmp_path / "out").iterdir()))))
    export_model(convert_model(source_model("mistral-gqa")), tmp_path / "out", push_to_hub="me/tiny-mistral")
    assert calls["create"] == ("me/tiny-mistral", True)
    repo_id, files = calls["upload"]
    assert repo_id == "me/tiny-mistral"
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= set(files)
    assert not [f for f in files if f.endswith(".py")]


def test_export_source_is_checked_before_training(tmp_path):
    from revformer.config import ConfigError, load_run_config
    from revformer.trainer import check_export

    work = make_workdir(tmp_path)
    run = load_run_config(work / "tiny.yaml", ["--train.export_source", "true"])  # the default sublayer coupling
    with pytest.raises(ConfigError, match="train.export_source is true, but Cannot export"):
        check_export(run)
    check_export(load_run_config(work / "tiny.yaml", ["--train.export_source", "true", "--model.coupling", "bdia"]))


def test_the_pretrain_and_export_recipe_exports_a_llama():
    from revformer.config import load_run_config
    from revformer.export import export_family
    from revformer.trainer import check_export

    run = load_run_config(ROOT / "configs/tiny_llama.yaml")
    assert run.train.export_source
    check_export(run)
    assert export_family(run.model_config(vocab_size=4096)) == "llama"
