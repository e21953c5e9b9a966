"""Converting Llama-family models: every weight placed, the converted forward equal to its coupling written with the
source's own modules, and everything a revformer model does (gradients, cache, save/load, remote code) still works."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from revformer import ConversionError, RevformerForCausalLM, convert_model, convert_to_revformer
from revformer.conversion import weight_map
from revformer.loss import Teacher

from conftest import ROOT, relative_error, run_benchmark

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# One tiny model per supported family, each with the options that family brings.
FAMILIES = {
    "llama-gqa-llama3-tied": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "llama-biases-untied": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "mistral-gqa": lambda: MistralForCausalLM(MistralConfig(
        **COMMON, num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False)),
    "qwen2-qkv-bias": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qk-norm-head-dim": lambda: Qwen3ForCausalLM(Qwen3Config(
        **COMMON, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
}


def source_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    with torch.no_grad():  # random norms and biases, so that a misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def reference_logits(source: torch.nn.Module, ids: torch.Tensor, coupling: str,
                     gammas: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The coupling written naively with the source's own modules (sdpa, causal, no mask); `gammas`: the bdia
    coupling's per-sequence gamma of each layer after the first (None: evaluation, gamma = 0)."""
    base = source.model
    emb = base.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rope = base.rotary_emb(emb, positions)
    if coupling == "sublayer":  # y1 = x1 + A(x2); y2 = x2 + M(y1); h = the newest stream, y2
        x1 = x2 = emb
        for layer in base.layers:
            x1 = x1 + layer.self_attn(layer.input_layernorm(x2), position_embeddings=rope, attention_mask=None)[0]
            x2 = x2 + layer.mlp(layer.post_attention_layernorm(x1))
        hidden = x2
    else:  # p[l+1] = g p[l-1] + (1 - g) p[l] + (1 + g) f_l(p[l]); p[1] = p[0] + f_0(p[0])
        previous = current = emb
        for i, layer in enumerate(base.layers):
            update = layer(current, attention_mask=None, position_embeddings=rope, position_ids=positions) - current
            g = 0.0 if i == 0 or gammas is None else gammas[i - 1]
            previous, current = current, g * previous + (1 - g) * current + (1 + g) * update
        hidden = current
    return source.lm_head(base.norm(hidden))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("coupling", ["sublayer", "bdia"])
def test_converted_forward_equals_its_coupling_written_with_the_source_modules(family, coupling):
    source = source_model(family)
    source.config._attn_implementation = "sdpa"
    model = convert_model(source, coupling=coupling)
    ids = torch.randint(3, 96, (2, 20))
    with torch.no_grad():
        expected = reference_logits(source, ids, coupling)
        got = model(ids).logits
    assert relative_error(got, expected) < 1e-5
    if coupling == "bdia":  # out of training, bdia is the source itself
        assert relative_error(got, source(ids).logits) < 1e-5


@pytest.mark.parametrize("family", ["llama-gqa-llama3-tied", "qwen3-qk-norm-head-dim"])
def test_bdia_in_training_equals_its_coupling_with_the_same_gamma_draws(family):
    """In training each layer after the first draws gamma = +-bdia_gamma per sequence; the reversible forward equals
    the naive coupling under those draws (and the gradients equal plain autograd: tests/test_reversible.py)."""
    source = source_model(family)
    source.config._attn_implementation = "sdpa"
    model = convert_model(source, coupling="bdia").train()
    ids = torch.randint(3, 96, (4, 20))
    torch.manual_seed(3)
    got = model(ids).logits  # grad enabled: the reversible engine
    torch.manual_seed(3)
    g = model.config.bdia_gamma
    assert g == 2.0**-4  # what convert.py chooses (docs/conversion.md)
    gammas = [torch.randint(0, 2, (4, 1, 1)).mul(2).sub(1) * g for _ in range(len(source.model.layers) - 1)]
    assert {v.item() for gamma in gammas for v in gamma.flatten()} == {-g, g}
    with torch.no_grad():
        expected = reference_logits(source, ids, "bdia", gammas=gammas)
        assert relative_error(expected, source(ids).logits) > 1e-3  # the draws do change the function
    assert relative_error(got.detach(), expected) < 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_source_tensor_lands_in_one_place(family):
    source = source_model(family)
    model = convert_model(source)
    names = list(source.state_dict())
    mapping = weight_map(names, tied=source.config.tie_word_embeddings)
    assert set(mapping) == set(names)
    target = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in source.state_dict().items():
        assert torch.equal(target[mapping[name]], tensor), name
    # ... and every revformer parameter comes from the source.
    assert {n for n, _ in model.named_parameters()} <= set(mapping.values())
    expected = {"qwen2-qkv-bias": "model.layers.0.attention.q_proj.bias",
                "qwen3-qk-norm-head-dim": "model.layers.0.attention.k_norm.weight",
                "llama-biases-untied": "model.layers.2.feed_forward.down_proj.bias"}
    if family in expected:
        assert expected[family] in mapping.values()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("coupling", ["sublayer", "bdia"])
def test_converted_model_trains_reversibly_generates_and_reloads(family, coupling, tmp_path):
    model = convert_model(source_model(family), coupling=coupling).float()
    ids = torch.randint(3, 96, (2, 24))
    model.train()
    grads = {}
    for reversible in (True, False):
        model.config.reversible = reversible
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same gamma draws (bdia) on both paths
        model(input_ids=ids, labels=ids).loss.backward()
        grads[reversible] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in grads[True]:
        assert relative_error(grads[True][name], grads[False][name]) < 1e-4, name
    model.eval()
    prompt = ids[:1, :6]
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RevformerForCausalLM and loaded.config.coupling == coupling
    with torch.no_grad():
        assert relative_error(loaded(ids).logits, model(ids).logits) < 1e-6


def test_convert_script_writes_a_folder_that_loads_without_revformer(tmp_path, byte_tokenizer):
    source = source_model("qwen3-qk-norm-head-dim")
    source.save_pretrained(tmp_path / "source")
    byte_tokenizer.save_pretrained(tmp_path / "source")
    done = subprocess.run([sys.executable, "scripts/convert.py", str(tmp_path / "source"), str(tmp_path / "rev")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "rev"
    for name in ("config.json", "model.safetensors", "modeling_revformer.py", "tokenizer.json", "README.md"):
        assert (out / name).exists(), name
    assert "source" in (out / "README.md").read_text()
    ids = torch.randint(3, 96, (1, 16))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": source(ids).logits}, tmp_path / "expected.pt")  # bdia: the source itself
    result = run_without_revformer(f"""
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        error = ((logits - expected["logits"]).abs().max() / expected["logits"].abs().max()).item()
        assert error < 1e-5, error
        print("remote-ok", model.config.coupling)
    """, tmp_path)
    assert "remote-ok bdia" in result.stdout


def run_without_revformer(body: str, cwd) -> subprocess.CompletedProcess:
    """`body` (torch and AutoModelForCausalLM imported) run by a Python in which `import revformer` fails; it must
    succeed."""
    script = textwrap.dedent("""
        import sys
        sys.modules["revformer"] = None  # any `import revformer` now raises ImportError
        import torch
        from transformers import AutoModelForCausalLM
    """) + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_unsupported_sources_get_one_clear_error(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96))
    with pytest.raises(ConversionError, match=r"GPT2LMHeadModel.*learned absolute positions.*Supported: LlamaForCausalLM"):
        convert_model(gpt2)
    windowed = MistralConfig(**COMMON, sliding_window=16)
    with pytest.raises(ConversionError, match="sliding-window attention"):
        convert_model(MistralForCausalLM(windowed))
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConversionError, match="Cannot convert GPT2LMHeadModel"):
        convert_to_revformer(str(tmp_path / "gpt2"))
    done = subprocess.run([sys.executable, "scripts/convert.py", str(tmp_path / "gpt2"), str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "Cannot convert GPT2LMHeadModel" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, request):
    """A saved tiny Llama (GQA, untied head) and its conversion by scripts/convert.py, beside the test corpus."""
    from conftest import make_workdir
    from revformer.tokenizer import byte_tokenizer

    import yaml

    work = make_workdir(tmp_path_factory.mktemp("heal"))
    run = yaml.safe_load((work / "tiny.yaml").read_text())
    (work / "heal.yaml").write_text(yaml.safe_dump({"data": run["data"], "train": run["train"]}))  # no model section
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    teacher.save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    for folder, coupling in (("rev", "sublayer"), ("rev_bdia", "bdia")):  # one that needs healing, the default
        done = subprocess.run([sys.executable, str(ROOT / "scripts/convert.py"), str(work / "teacher"),
                               str(work / folder), "--coupling", coupling], cwd=work, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    return work


def heal(work, out: str, processes: int = 1, accelerate_config: str = "cpu_ddp.yaml", steps: str = "6"):
    from conftest import launch

    return launch("finetune.py", work, "--config", "heal.yaml", "--train.init_from", str(work / "rev"),
                  "--train.distill_from", str(work / "teacher"), "--train.distill_ce_weight", "0.5",
                  "--train.output_dir", str(work / out), "--train.max_steps", steps, "--train.warmup_steps", "1",
                  "--train.learning_rate", "3e-3", "--train.gradient_accumulation_steps", "2",
                  "--model.hidden_dropout", "0.0", "--model.chunk_size_feed_forward", "24",
                  "--model.loss_chunk_size", "40", processes=processes, accelerate_config=accelerate_config)


def validation_loss(work, folder) -> float:
    import json

    done = subprocess.run([sys.executable, str(ROOT / "scripts/evaluate.py"), str(folder), "--config", "heal.yaml"],
                          cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["eval/loss"]


@pytest.mark.slow
def test_a_converted_model_heals_by_distillation_through_the_cli(converted):
    heal(converted, "healed", steps="16")
    before, after = validation_loss(converted, converted / "rev"), validation_loss(converted, converted / "healed/model")
    assert after < before - 0.1, (before, after)


@pytest.mark.slow
def test_a_bdia_conversion_scores_as_its_source_and_fine_tunes_through_the_cli(converted):
    from conftest import launch

    teacher = validation_loss(converted, converted / "teacher")
    before = validation_loss(converted, converted / "rev_bdia")
    assert abs(before / teacher - 1) < 1e-5, (teacher, before)
    result = launch("finetune.py", converted, "--config", "heal.yaml", "--train.init_from", str(converted / "rev_bdia"),
                    "--train.output_dir", str(converted / "bdia_tuned"), "--train.max_steps", "16",
                    "--train.warmup_steps", "1", "--train.learning_rate", "3e-3", "--model.chunk_size_feed_forward",
                    "24", "--model.loss_chunk_size", "40", "--train.export_source", "true")
    after = validation_loss(converted, converted / "bdia_tuned/model")
    assert after < before - 0.1, (before, after)
    assert "Exported the final model as a llama model" in result.stdout
    export_runs_without_revformer(converted / "bdia_tuned", converted)


def export_runs_without_revformer(run, work):
    """The run's `export` folder (train.export_source), loaded where revformer cannot be imported and remote code is
    off: a plain LlamaForCausalLM with the fine-tuned model's logits and greedy generations, cached or not."""
    from revformer.tokenizer import load_tokenizer

    out = run / "export"
    assert not list(out.glob("*.py")) and (out / "tokenizer.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and config["tie_word_embeddings"] is False
    card = (out / "README.md").read_text()
    assert "revformer" in card and "16 steps" in card
    tuned = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    assert type(tuned) is RevformerForCausalLM
    tokenizer = load_tokenizer(str(run / "model"))
    ids = torch.tensor([tokenizer.encode("def main():\n    return")])
    with torch.no_grad():
        expected = {"ids": ids, "logits": tuned(ids).logits,
                    "tokens": tuned.generate(ids[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)}
    torch.save(expected, work / "expected_export.pt")
    done = run_without_revformer(f"""
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=False).eval()
        expected = torch.load({str(work / "expected_export.pt")!r})
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        print("error", ((logits - expected["logits"]).abs().max() / expected["logits"].abs().max()).item())
        for use_cache in (True, False):
            tokens = model.generate(expected["ids"][:, :8], max_new_tokens=8, do_sample=False, use_cache=use_cache,
                                    pad_token_id=0)
            assert torch.equal(tokens, expected["tokens"]), (use_cache, tokens, expected["tokens"])
        print("plain-ok", type(model).__name__)
    """, work)
    assert "plain-ok LlamaForCausalLM" in done.stdout
    error = float(done.stdout.split("error ")[1].split()[0])
    print(f"export logits vs the fine-tuned revformer model: relative error {error:.2e}")
    assert error < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", ["cpu_ddp.yaml", "fsdp_cpu.yaml"])
def test_healing_on_two_processes_equals_one(converted, accelerate_config):
    from conftest import weights

    if not (converted / "single" / "model").exists():
        heal(converted, "single")
    result = heal(converted, accelerate_config, processes=2, accelerate_config=accelerate_config)
    assert "2 process(es)" in result.stdout
    single, parallel = weights(converted / "single"), weights(converted / accelerate_config)
    assert single.keys() == parallel.keys()
    for name in single:
        assert torch.allclose(parallel[name], single[name], atol=2e-5, rtol=1e-4), name


@pytest.mark.parametrize("loss_chunk_size", [0, 7])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_distillation_loss_equals_a_naive_full_logits_kl(loss_chunk_size, ce_weight):
    import torch.nn.functional as F

    from conftest import tiny_config

    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(loss_chunk_size=loss_chunk_size, tie_word_embeddings=False)).train()
    ids = torch.randint(3, 128, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored positions count neither in the KL nor in the denominator
    teacher_hidden, teacher_head = torch.randn(2, 16, 24), torch.randn(128, 24)
    kwargs = dict(teacher=Teacher(teacher_hidden, teacher_head, ce_weight))
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    got = torch.autograd.grad(loss, [model.lm_head.weight, model.model.embed_tokens.weight])

    logits = model(input_ids=ids).logits[:, :-1].flatten(0, 1)
    teacher_logits = (teacher_hidden @ teacher_head.T)[:, :-1].flatten(0, 1)
    targets = labels[:, 1:].flatten()
    keep = targets != -100
    kl = F.kl_div(logits[keep].log_softmax(-1), teacher_logits[keep].log_softmax(-1), log_target=True,
                  reduction="batchmean")
    reference = kl + ce_weight * F.cross_entropy(logits[keep], targets[keep])
    expected = torch.autograd.grad(reference, [model.lm_head.weight, model.model.embed_tokens.weight])
    assert torch.allclose(loss, reference, rtol=1e-5)
    for a, b in zip(got, expected):
        assert relative_error(a, b) < 1e-5
    with torch.no_grad():  # evaluation path: the same value without gradients
        assert torch.allclose(model(input_ids=ids, labels=labels, **kwargs).loss, reference, rtol=1e-5)
    with pytest.raises(ValueError, match="share the vocabulary"):
        model(input_ids=ids, labels=labels, teacher=Teacher(teacher_hidden, teacher_head[:100]))


@pytest.mark.slow  # about ten CLI processes (pretrain, convert, evaluate, heal, from scratch) and eight memory workers
def test_benchmark_conversion_tiny(tmp_path):
    """python -m benchmarks conversion --tiny through teacher, heal (bdia: nothing to heal), gamma, scratch, memory and
    report (the heal and fine-tuning stages run the same train/evaluate commands as scratch; left out for time)."""
    run_benchmark("conversion", "--tiny", "--work", str(tmp_path), "--couplings", "bdia",
                  "--stages", "teacher,heal,gamma,scratch,memory,report")
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert set(results) == {"teacher", "teacher/eval", "convert/bdia", "heal/bdia", "gamma", "scratch", "memory"}
    assert set(results["gamma"]) == {"0", "0.5"}  # --tiny scores one gamma (the full run: 1/2 to 1/16)
    assert results["gamma"]["0.5"] != results["gamma"]["0"]  # training's network is not evaluation's
    assert results["teacher"]["final_loss"] > 0
    # A bdia conversion is its teacher until trained, scored by the same command.
    assert abs(results["convert/bdia"]["loss"] / results["teacher/eval"]["loss"] - 1) < 1e-5
    assert results["heal/bdia"]["tokens"] == 0  # within 2% of the teacher as converted: nothing to heal
    assert results["scratch"]["tokens"] == 3 * 4 * 64 and results["scratch"]["curve"]  # steps x batch x block
    memory = {(r["model"], r["layers"], r["vocab"]): r for r in results["memory"]}
    assert set(memory) == {(m, n, 1024) for m in ("revformer (converted, bdia)", "teacher + checkpointing",
                                                   "teacher + checkpointing + chunked loss", "teacher")
                           for n in (2, 4)}
    assert all(r["peak_growth_bytes"] > 0 and r["torch"] for r in memory.values())
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "| bdia | " in readme and "| model | 2 layers | 4 layers |" in readme and "vocabulary of 1024" in readme
    assert "at 256 tokens" in readme and (tmp_path / "results" / "healing.png").stat().st_size > 0


def test_a_source_and_its_bdia_conversion_score_alike_on_packed_documents():
    """`evaluate` and the distillation teacher pass use_cache=False: transformers' models otherwise build a cache
    and attend across the documents that position_ids mark. A bdia conversion (the source out of training) then
    gets the source's loss and hidden states on packed multi-document blocks, and both keep documents apart."""
    from accelerate import Accelerator

    from revformer.data import document_position_ids
    from revformer.trainer import evaluate, teacher_targets

    source = source_model("llama-gqa-llama3-tied")
    model = convert_model(source, coupling="bdia")
    eos = source.config.eos_token_id
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (6, 24), generator=generator)
    ids[:, 7] = eos  # every block holds two documents (and a third in some)
    ids[::2, 16] = eos
    blocks = [{"input_ids": row} for row in ids]
    accelerator = Accelerator(cpu=True)
    losses = [evaluate(m, blocks, accelerator, batch_size=4)["eval/loss"] for m in (source, model)]
    assert abs(losses[0] - losses[1]) < 1e-5 * losses[0], losses
    crossing = evaluate(source, blocks, accelerator, batch_size=4, document_attention=False)["eval/loss"]
    assert abs(crossing - losses[0]) > 1e-3  # the documents do matter here
    positions = document_position_ids(ids, eos)
    source.eval(), model.eval()  # evaluate() leaves models in train mode, where bdia draws its gamma
    hidden = teacher_targets(source, ids, positions, 0.0)["teacher"].hidden
    with torch.no_grad():
        alone = source.model(ids[:, 8:16], use_cache=False).last_hidden_state  # the second document by itself
        converted = model.model(ids, position_ids=positions).last_hidden_state
    assert relative_error(hidden[:, 8:16], alone) < 1e-5
    assert relative_error(hidden, converted) < 1e-5


def test_lora_adapters_on_a_bdia_conversion_train_through_the_reversible_engine():
    """PEFT's LoRA on what convert_model makes (bdia, fixed-point streams): only the adapters get gradients, equal
    to plain autograd's under the same gamma draws; training lowers the loss; merged weights give the same logits."""
    from peft import LoraConfig, get_peft_model

    model = convert_model(source_model("llama-gqa-llama3-tied")).float()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, lora).train()
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without gradient
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    ids = torch.randint(3, 96, (2, 24))
    grads = {}
    for reversible in (True, False):
        model.config.reversible = reversible
        peft_model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same gamma draws on both paths
        peft_model(input_ids=ids, labels=ids).loss.backward()
        grads[reversible] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(grads[True]) == trainable and trainable and all("lora_" in n for n in trainable)
    for name in trainable:
        assert relative_error(grads[True][name], grads[False][name]) < 1e-5, name
    model.config.reversible = True
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        assert type(merged) is RevformerForCausalLM
        assert relative_error(merged(input_ids=ids).logits, adapted) < 1e-5
