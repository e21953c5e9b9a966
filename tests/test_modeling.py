"""RevformerForCausalLM as a Hugging Face model: config, save/load, remote code, generation, pipelines."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, pipeline

import revformer
from conftest import relative_error, tiny_config
from revformer import RevformerConfig, RevformerForCausalLM


@pytest.fixture
def model():
    torch.manual_seed(0)
    return RevformerForCausalLM(tiny_config()).eval()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible by num_attention_heads"),
        (dict(hidden_size=30, num_attention_heads=6), "even head dimension"),
        (dict(attention_layers=["full", "lsh", "full"]), "attention_layers has 3 entries"),
        (dict(attention_layers="sparse"), "Unknown attention kind"),
        (dict(attention_dropout=1.5), "attention_dropout must be in [0, 1)"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(stream_dtype="int8"), "stream_dtype must be one of"),
        (dict(coupling="bdia", bdia_gamma=0.3), "bdia_gamma must be a power of two"),
        (dict(coupling="leapfrog"), "coupling must be one of"),
    ],
)
def test_config_rejects_inconsistent_values(overrides, message):
    with pytest.raises(Exception, match=re.escape(message)):
        tiny_config(**overrides)


def test_config_round_trips_through_dict_and_auto_config(tmp_path):
    config = tiny_config(attention_layers=["local", "lsh"], reversible=False, loss_chunk_size=16)
    assert RevformerConfig(**config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RevformerConfig)
    assert loaded.attention_layers == ["local", "lsh"] and loaded.reversible is False and loaded.loss_chunk_size == 16


def relative_imports(folder, module: str) -> set[str]:
    """The module files `module` imports relatively (`from .x import ...`), transitively, as found in `folder`."""
    found, todo = set(), [module]
    while todo:
        name = todo.pop()
        found.add(name)
        source = (folder / f"{name}.py").read_text()
        todo += [m for m in re.findall(r"^from \.(\w+) import", source, flags=re.M) if m not in found]
    return found


def test_save_and_load_round_trip(model, tmp_path):
    ids = torch.randint(0, 128, (2, 20))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    # The code travels with the weights: every module the remote code imports, read from the package itself.
    package = Path(revformer.__file__).parent
    needed = relative_imports(package, "modeling_revformer") | relative_imports(package, "configuration_revformer")
    assert {"modeling_revformer", "configuration_revformer", "reversible", "attention", "loss"} <= needed
    for name in needed:
        assert (tmp_path / f"{name}.py").exists(), name
        assert not re.search(r"^(from|import) revformer", (tmp_path / f"{name}.py").read_text(), flags=re.M), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RevformerForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_remote_code_load_without_revformer_importable(model, tmp_path):
    ids = torch.randint(0, 128, (1, 12))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["revformer"] = None  # any `import revformer` now raises ImportError
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("revformer"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        model.train()  # a reversible training step: the engine and the chunked loss from the folder's own code
        loss = model(expected["ids"], labels=expected["ids"]).loss
        loss.backward()
        assert torch.isfinite(loss) and model.lm_head.weight.grad is not None
        print("remote-ok", type(model).__module__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-ok transformers_modules" in result.stdout


def test_greedy_generation_is_identical_with_and_without_cache(model):
    prompt = torch.randint(3, 128, (2, 7))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 19)
    assert torch.equal(with_cache, without_cache)


def test_left_padded_batch_matches_unpadded_sequences(model):
    short, long = torch.randint(3, 128, (1, 5)), torch.randint(3, 128, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    batch = torch.cat([padded, long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        batched = model(batch, attention_mask=mask, position_ids=position_ids).logits[:, -1]
        alone = torch.cat([model(short).logits[:, -1], model(long).logits[:, -1]])
    assert torch.allclose(batched, alone, atol=1e-5)
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    single = model.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[0, -6:], single[0, -6:])


def test_text_generation_pipeline(byte_tokenizer):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(byte_tokenizer), pad_token_id=byte_tokenizer.pad_token_id,
                         bos_token_id=byte_tokenizer.bos_token_id, eos_token_id=byte_tokenizer.eos_token_id)
    model = RevformerForCausalLM(config).eval()
    generator = pipeline("text-generation", model=model, tokenizer=byte_tokenizer)
    out = generator("def main():", max_new_tokens=8, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("def main():") and len(byte_tokenizer(text).input_ids) > len(byte_tokenizer("def main():").input_ids)


def test_hidden_states_inputs_embeds_logits_to_keep_and_tuples(model):
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        assert torch.allclose(from_embeds, out.logits)
        assert torch.allclose(model(ids, logits_to_keep=1).logits, out.logits[:, -1:], atol=1e-6, rtol=1e-5)
        as_tuple = model(ids, labels=ids, return_dict=False)
        assert torch.is_tensor(as_tuple[0]) and as_tuple[0].dim() == 0 and as_tuple[1].shape == out.logits.shape


def test_loss_matches_manual_shifted_cross_entropy_and_ignores_minus_100(model):
    ids = torch.randint(0, 128, (2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 128)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    with torch.no_grad():  # Trainer's num_items_in_batch sets the denominator
        summed = model(ids, labels=labels, num_items_in_batch=1).loss
    assert torch.allclose(summed, expected * (labels[:, 1:] != -100).sum(), rtol=1e-5)


def _revformer_log():
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    return CaptureLogger(logging.get_logger("revformer.modeling_revformer"))


def test_generation_runs_past_max_position_embeddings_with_one_warning():
    """A 30-token prompt and 8 new tokens on a 32-position model: all 8 come out (Llama's behaviour), equal to the
    uncached forward's greedy choices, and one warning names RoPE scaling."""
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(max_position_embeddings=32, rms_norm_eps=1.1e-6)).eval()
    prompt = torch.randint(3, 128, (1, 30))
    with _revformer_log() as captured:
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 38)
    assert captured.out.count("past the 32 positions") == 1 and "rope_type': 'yarn'" in captured.out
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[0, 29:].argmax(-1), out[0, 30:])


@pytest.mark.parametrize("overrides", [
    {}, {"attention_layers": ["local", "lsh"]}, {"coupling": "bdia", "num_key_value_heads": 2, "qk_norm": True},
], ids=["full", "local+lsh", "bdia+gqa+qk_norm"])
def test_packed_row_longer_than_the_context_equals_its_documents(overrides):
    """A padding-free row (TRL packing, DataCollatorWithFlattening) is longer than max_position_embeddings while
    no position in it is: it runs without a warning, and each document's logits and gradients equal its own run's."""
    torch.manual_seed(0)
    config = tiny_config(max_position_embeddings=16, local_chunk_length=4, lsh_chunk_length=4, lsh_num_buckets=4,
                         rms_norm_eps=1.2e-6, **overrides)
    model = RevformerForCausalLM(config).eval()  # eval: fixed LSH rotations (gradients still flow, reversibly)
    docs = [torch.randint(3, 128, (1, n)) for n in (16, 11, 16, 5)]
    row = torch.cat(docs, dim=1)  # 48 tokens
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs]).unsqueeze(0)
    with _revformer_log() as captured:
        packed = model(row, position_ids=positions, labels=row)
    assert "past the" not in captured.out
    packed.logits.sum().backward()
    packed_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    start, total = 0, 0
    for doc in docs:
        alone = model(doc)
        end = start + doc.shape[1]
        assert relative_error(packed.logits[:, start:end], alone.logits) < 1e-5
        total = total + alone.logits.sum()
        start = end
    total.backward()
    assert relative_error(packed_grad, model.lm_head.weight.grad) < 1e-4


@pytest.mark.parametrize("bad", [128, 500, -1])
def test_token_id_outside_the_vocabulary_names_it(model, bad):
    ids = torch.tensor([[5, 6, bad, 7]])
    with pytest.raises(ValueError, match=rf"Token id {bad} is outside .*vocab_size=128.*tokenizer"):
        model(ids)


def test_empty_input_gets_a_clear_error(model):
    with pytest.raises(ValueError, match=r"Empty input: input_ids has shape \(1, 0\)"):
        model(torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.parametrize("kind", ["full", "local", "lsh"])
def test_returned_attentions_and_hidden_states_are_on_the_graph(kind):
    """ModelTesterMixin.test_retain_grad_hidden_states_attentions, with left padding (a row whose first queries see
    no key): the returned probabilities are the ones the output is made of, so `retain_grad` gets a gradient."""
    torch.manual_seed(0)
    config = tiny_config(attention_layers=kind, local_chunk_length=4, lsh_chunk_length=4, lsh_num_buckets=2,
                         output_attentions=True, output_hidden_states=True)
    model = RevformerForCausalLM._from_config(config, attn_implementation="eager")
    ids = torch.randint(3, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    out = model(input_ids=ids, attention_mask=mask)
    attentions, hidden = out.attentions[0], out.hidden_states[0]
    attentions.retain_grad()
    hidden.retain_grad()
    out[0][1].sum().backward()
    assert attentions.grad is not None and hidden.grad is not None
    assert attentions.grad[1].abs().sum() > 0
    assert torch.all(attentions[0, :, :3] == 0)  # padded queries see nothing and get zero probabilities


def test_gradient_checkpointing_and_peft_hooks_work():
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(reversible=False)).train()
    ids = torch.randint(0, 128, (2, 16))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable()
    assert model.model.gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert relative_error(p.grad, plain[n]) < 1e-6, n
    model.enable_input_require_grads()  # used by PEFT with frozen embeddings
    model.get_input_embeddings().weight.requires_grad_(False)
    assert model(ids, labels=ids).loss.requires_grad


def test_resize_token_embeddings_keeps_tying(model):
    model.resize_token_embeddings(140)
    assert model.config.vocab_size == 140
    assert model.lm_head.weight.shape == (140, 32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert model(torch.tensor([[139, 5]])).logits.shape == (1, 2, 140)


def test_eager_and_sdpa_agree():
    torch.manual_seed(0)
    sdpa = RevformerForCausalLM(tiny_config()).eval()
    eager = RevformerForCausalLM(tiny_config(attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.model.layers[0].attention.kernel_name() == "eager"
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(eager(ids).logits, sdpa(ids).logits, atol=1e-5)


def test_generation_from_embeds_from_a_returned_cache_and_with_other_decoders():
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(initializer_range=0.5)).eval()  # large weights: varied greedy tokens
    ids = torch.randint(3, 128, (1, 6))
    greedy = dict(do_sample=False, pad_token_id=0)
    reference = model.generate(ids, max_new_tokens=8, **greedy)
    assert len(set(reference[0, 6:].tolist())) > 2  # a meaningful reference, not one repeated token
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=8, **greedy), reference[:, 6:])
    first = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, **greedy)
    continued = model.generate(first.sequences, cache=first.cache, max_new_tokens=5, **greedy)
    assert torch.equal(continued, reference)
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=2, max_new_tokens=8, **greedy), reference)
    beams = model.generate(ids, num_beams=3, num_return_sequences=3, max_new_tokens=8, pad_token_id=0)
    assert beams.shape == (3, 14) and torch.equal(beams[:, :6], ids.expand(3, -1))
    sampled = model.generate(ids, do_sample=True, top_k=20, max_new_tokens=8, pad_token_id=0)
    assert sampled.shape == (1, 14)


def test_shift_labels_set_the_targets(model):
    """Context-parallel training passes labels already shifted (`shift_labels`, one shard's targets): the loss is
    against them, equal to `labels` shifted inside when they are the same targets."""
    ids = torch.randint(3, 128, (2, 12))
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        inside = model(ids, labels=ids).loss
        given = model(ids, labels=ids, shift_labels=shifted).loss
        alone = model(ids, shift_labels=shifted).loss
        other = model(ids, labels=ids, shift_labels=torch.roll(shifted, 1, dims=1).masked_fill(shifted < 0, -100)).loss
    torch.testing.assert_close(given, inside)
    torch.testing.assert_close(alone, inside)
    assert not torch.allclose(other, inside)


def test_past_key_values_is_the_deprecated_name_of_cache(model):
    from transformers import DynamicCache

    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        reference = model(ids[:, :4], cache=DynamicCache(config=model.config), use_cache=True)
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
            old = model(ids[:, :4], past_key_values=DynamicCache(config=model.config), use_cache=True)
        torch.testing.assert_close(old.logits, reference.logits)
        step = model(ids[:, 4:], cache=old.cache, use_cache=True).logits
        full = model(ids).logits
    torch.testing.assert_close(step, full[:, 4:], rtol=1e-5, atol=1e-5)


def test_from_pretrained_overrides_rederive_and_validate(tmp_path):
    """`from_pretrained(folder, num_hidden_layers=...)` rebuilds the per-layer attention list and head_dim from the
    overrides (they used to be set on the built config and left stale), and an ambiguous override is refused."""
    RevformerForCausalLM(tiny_config()).save_pretrained(tmp_path / "uniform")
    deeper = RevformerConfig.from_pretrained(tmp_path / "uniform", num_hidden_layers=4)
    assert deeper.num_hidden_layers == 4 and deeper.attention_layers == ["full"] * 4
    assert RevformerConfig.from_pretrained(tmp_path / "uniform", attention_layers="local").attention_layers == [
        "local", "local"]  # fmt: skip
    wider = RevformerConfig.from_pretrained(tmp_path / "uniform", hidden_size=64)
    assert wider.head_dim == 16 and wider.num_key_value_heads == 4
    fewer_heads = RevformerConfig.from_pretrained(tmp_path / "uniform", num_attention_heads=2)
    assert fewer_heads.head_dim == 16 and fewer_heads.num_key_value_heads == 2
    model = RevformerForCausalLM.from_pretrained(tmp_path / "uniform", num_hidden_layers=1)
    assert len(model.model.layers) == 1 and model.config.attention_layers == ["full"]  # the first layer's weights
    tiny_config(attention_layers=["local", "lsh"]).save_pretrained(tmp_path / "mixed")
    with pytest.raises(ValueError, match="pass attention_layers too"):
        RevformerConfig.from_pretrained(tmp_path / "mixed", num_hidden_layers=4)
    assert RevformerConfig.from_pretrained(tmp_path / "mixed", num_hidden_layers=4,
                                           attention_layers=["local", "lsh"] * 2).num_hidden_layers == 4
