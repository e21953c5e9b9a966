"""Hugging Face conventions that tools built on transformers rely on, tested as behaviour.

Each test mirrors a capability that transformers' common model tests (ModelTesterMixin / GenerationTesterMixin)
check for models inside the library, compared against LlamaForCausalLM where the convention is Llama's.
"""

from __future__ import annotations

import pytest
import torch
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from conftest import relative_error, tiny_config
from revformer import RevformerForCausalLM
from revformer import modeling_revformer


def _grads(model: RevformerForCausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- gradient checkpointing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients(reentrant):
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(reversible=False, hidden_dropout=0.1)).train()
    ids = torch.randint(3, 128, (2, 16))
    calls = []
    for block in model.model.layers:
        block.attention.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    reference = _grads(model, ids)
    assert len(calls) == 2  # one forward per block
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_activation_checkpointing
    calls.clear()
    torch.manual_seed(1)
    checkpointed = _grads(model, ids)
    assert len(calls) == 4  # each block re-run in backward: it is really checkpointed
    assert checkpointed.keys() == reference.keys()
    for name, grad in reference.items():  # dropout masks replayed by checkpoint's RNG handling
        assert relative_error(checkpointed[name], grad) < 1e-5, name
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing
    calls.clear()
    _grads(model, ids)
    assert len(calls) == 2


def test_activation_checkpointing_on_reversible_path_sets_the_flag_and_recomputes_nothing_more():
    """The reversible backward is the recomputation: enabling checkpointing (as Trainer, TRL and PEFT do) sets the
    flag that they and transformers' common tests read on every module that has one, and the engine still runs each
    block once forward and once in backward, with the same gradients."""
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config()).train()
    ids = torch.randint(3, 128, (2, 16))
    reference = _grads(model, ids)
    calls = []
    model.model.layers[0].attention.register_forward_hook(lambda *_: calls.append(1))
    assert not model.is_activation_checkpointing
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert len(flagged) >= 1 + len(model.model.layers) and all(m.gradient_checkpointing for m in flagged)
    with pytest.warns(FutureWarning):  # the deprecated alias answers the same
        assert model.is_gradient_checkpointing
    grads = _grads(model, ids)
    assert len(calls) == 2  # the engine's forward and its one re-run in backward: nothing checkpoints on top
    for name, grad in reference.items():
        assert relative_error(grads[name], grad) < 1e-6, name
    # A forward that returns hidden states runs the plain stack, where the flag checkpoints each block.
    calls.clear()
    model(ids, labels=ids, output_hidden_states=True).loss.backward()
    assert len(calls) == 2
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing
    assert not any(m.gradient_checkpointing for m in flagged)


# --- RoPE scaling -----------------------------------------------------------------------------------------------

ROPE_CASES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}  # fmt: skip


@pytest.mark.parametrize("rope_type", sorted(ROPE_CASES))
def test_rope_tables_equal_llamas(rope_type):
    """cos/sin for every RoPE type equal LlamaRotaryEmbedding's for the same parameters (inside and past the
    pretraining length: `dynamic` recomputes its frequencies there)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {**ROPE_CASES[rope_type], "rope_theta": 5000.0}
    ours = RevformerForCausalLM(tiny_config(rope_parameters=dict(params), max_position_embeddings=256))
    llama = LlamaRotaryEmbedding(
        LlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=256, rope_parameters=dict(params))
    )
    x = torch.zeros(1, dtype=torch.float32)
    for length in (40, 256, 700 if rope_type == "dynamic" else 256):
        positions = torch.arange(length).unsqueeze(0)
        cos, sin = ours.model.rotary_emb(x, positions)
        cos_ref, sin_ref = llama(x, positions)
        torch.testing.assert_close(cos, cos_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin, sin_ref, rtol=1e-6, atol=1e-6)


def test_rope_scaling_changes_logits_as_llamas_does():
    """ModelTesterMixin.test_model_rope_scaling_from_config: on a short input `dynamic` equals no scaling and
    `linear` does not; past max_position_embeddings every model runs (with one warning naming RoPE scaling) and
    `dynamic`, `linear` differ from no scaling."""
    ids_short = torch.randint(3, 128, (1, 10))
    ids_long = torch.randint(3, 128, (1, 100))

    def logits(params, ids):
        torch.manual_seed(0)
        model = RevformerForCausalLM(tiny_config(max_position_embeddings=64, rope_parameters=params)).eval()
        with torch.no_grad():
            return model(ids).logits

    original = logits(None, ids_short)
    torch.testing.assert_close(logits({"rope_type": "dynamic", "factor": 4.0}, ids_short), original)
    assert not torch.allclose(logits({"rope_type": "linear", "factor": 4.0}, ids_short), original, atol=1e-5)
    with CaptureLogger(logging.get_logger(modeling_revformer.__name__)) as captured:
        original_long = logits(None, ids_long)
        logits(None, ids_long)
    assert captured.out.count("past the 64 positions") == 1, captured.out
    assert "rope_type': 'yarn'" in captured.out  # names the fix
    torch.testing.assert_close(original_long[:, :64], logits(None, ids_long[:, :64]), rtol=1e-5, atol=1e-5)
    for scaling in ("dynamic", "linear"):
        scaled_long = logits({"rope_type": scaling, "factor": 4.0}, ids_long)
        assert not torch.allclose(scaled_long, original_long, atol=1e-5), scaling


def test_yarn_runs_a_short_trained_model_four_times_longer(tmp_path):
    """A model pretrained at 64 positions, loaded with yarn x4 and max_position_embeddings=256, runs and fine-tunes at
    256 tokens, with its weights unchanged (RoPE has none) and the yarn frequencies equal transformers' own."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(max_position_embeddings=64))
    model.save_pretrained(tmp_path)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    long = RevformerForCausalLM.from_pretrained(tmp_path, max_position_embeddings=256, rope_parameters=yarn)
    assert long.config.rope_parameters["rope_theta"] == 10000.0  # a replaced dict keeps the trained base
    expected, _ = ROPE_INIT_FUNCTIONS["yarn"](long.config, None)
    torch.testing.assert_close(long.model.rotary_emb.inv_freq, expected)
    ids = torch.randint(3, 128, (2, 256))
    long.train()(ids, labels=ids).loss.backward()
    assert torch.isfinite(long.lm_head.weight.grad).all()
    # and the saved config round-trips
    long.save_pretrained(tmp_path / "long")
    again = RevformerForCausalLM.from_pretrained(tmp_path / "long")
    assert again.config.rope_parameters == long.config.rope_parameters
    torch.testing.assert_close(again.model.rotary_emb.inv_freq, expected)
    # A model trained with another base keeps it when the scaling is replaced (not transformers' default 10000).
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    model.save_pretrained(tmp_path / "theta")
    scaled = RevformerForCausalLM.from_pretrained(tmp_path / "theta", max_position_embeddings=256,
                                                  rope_parameters=dict(yarn))
    assert scaled.config.rope_parameters["rope_theta"] == 500000.0


def test_rope_theta_configs_keep_loading(tmp_path):
    import json

    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 500.0})).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = 500.0  # as configs saved before rope_parameters existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = RevformerForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    ids = torch.randint(3, 128, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_bad_rope_parameters_name_the_problem():
    with pytest.raises(Exception, match="factor"):
        tiny_config(rope_parameters={"rope_type": "yarn"})


# --- attention implementations and attention weights ------------------------------------------------------------

KINDS = {"full": "full", "local": "local", "lsh": "lsh", "mixed": ["full", "local", "lsh"]}


def _model(kinds="full", **overrides) -> RevformerForCausalLM:
    """Small windows so that local/lsh rules really differ from full attention at these lengths."""
    layers = 3 if isinstance(kinds, list) else 2
    config = tiny_config(attention_layers=kinds, num_hidden_layers=layers, local_chunk_length=4, lsh_chunk_length=3,
                         lsh_num_buckets=4, **overrides)  # fmt: skip
    torch.manual_seed(0)
    return RevformerForCausalLM(config).eval()


def _left_padded(batch=2, length=20, pad=5):
    ids = torch.randint(3, 128, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0
    return ids, mask


def test_set_attn_implementation_switches_every_full_layer_and_runs_registered_kernels():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("revformer_test_counting", counting)
    model = _model(["full", "local", "full"])
    ids, mask = _left_padded()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("revformer_test_counting")
        assert model.config._attn_implementation == "revformer_test_counting"
        switched = model(ids, attention_mask=mask).logits
    assert calls == [0, 2]  # every full layer, through the interface; the local layer keeps its own kernel
    torch.testing.assert_close(switched, reference)
    eager_calls = []
    model.set_attn_implementation("eager")
    layer = model.model.layers[0].attention
    layer.register_forward_hook(lambda *_: eager_calls.append(layer.kernel_name()))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, reference, rtol=1e-5, atol=1e-5)
    assert eager_calls == ["eager"]
    with pytest.raises(ValueError, match="not supported"):
        model.set_attn_implementation("no_such_kernel")


def test_from_pretrained_attn_implementation(tmp_path):
    _model().save_pretrained(tmp_path)
    for implementation in ("eager", "sdpa"):
        loaded = RevformerForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation)
        assert loaded.config._attn_implementation == implementation
        assert loaded.model.layers[0].attention.kernel_name() == implementation


@pytest.mark.parametrize("kinds", sorted(KINDS))
def test_eager_materializes_every_kernel_and_agrees_with_it(kinds):
    """Under eager, local/lsh layers run as dense attention over the same keys their linear-memory kernels see:
    the logits agree (left padding included), and so do hidden states and loss of a training step."""
    model = _model(KINDS[kinds])
    ids, mask = _left_padded()
    with torch.no_grad():
        kernels = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        dense = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(dense[real], kernels[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kinds", sorted(KINDS))
def test_output_attentions_are_the_probabilities_the_layer_used(kinds):
    """One (B, H, Tq, Tk) tensor per layer; rows sum to 1 over the keys a query may see and are 0 elsewhere
    (future keys, padding, keys outside a local window); requesting them changes no logit, and the probabilities
    rebuild the attention output exactly."""
    model = _model(KINDS[kinds])
    config = model.config
    ids, mask = _left_padded()
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert plain.attentions is None
    assert len(out.attentions) == config.num_hidden_layers
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-5)
    for layer, probs in zip(model.model.layers, out.attentions):
        assert probs.shape == (2, config.num_attention_heads, 20, 20)
        future = torch.ones(20, 20, dtype=torch.bool).triu(1)
        assert (probs[..., future] == 0).all()
        assert (probs[0, :, :, :5] == 0).all() and (probs[0, :, :5, :] == 0).all()  # padding keys and queries
        sums = probs.sum(-1)
        torch.testing.assert_close(sums[0, :, 5:], torch.ones_like(sums[0, :, 5:]))
        torch.testing.assert_close(sums[1], torch.ones_like(sums[1]))
        if layer.attention.kind == "local":  # query 13 (row 1) is in chunk 3 of 4 tokens: keys 8..13 only
            assert (probs[1, :, 13, :8] == 0).all() and (probs[1, :, 13, 8:14] > 0).all()
    # The weights are what the layer applied: re-run layer 0's value path with them.
    attention = model.model.layers[0].attention
    captured = {}
    attention.register_forward_hook(lambda mod, args, output: captured.update(x=args[0], cos=args[1], sin=args[2]))
    with torch.no_grad():
        model(ids, attention_mask=mask)
        h = attention.norm(captured["x"])
        v = attention.v_proj(h).view(2, 20, 4, -1).transpose(1, 2)
        rebuilt = attention.o_proj((out.attentions[0] @ v).transpose(1, 2).reshape(2, 20, -1))
        expected = attention(captured["x"], captured["cos"], captured["sin"], mask.bool())
    torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)


def test_output_attentions_from_config_and_in_training():
    """`config.output_attentions` turns them on (ModelTesterMixin.test_attention_outputs), and a training forward
    that asks for them runs the plain path with the same loss and gradients as the reversible engine."""
    model = _model(KINDS["mixed"], output_attentions=True)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        assert len(model(ids).attentions) == 3
    model.config.output_attentions = False
    model.train()
    torch.manual_seed(1)
    reference = model(ids, labels=ids)
    reference.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(1)
    out = model(ids, labels=ids, output_attentions=True)
    out.loss.backward()
    assert len(out.attentions) == 3 and out.attentions[0].requires_grad
    assert abs(out.loss.item() - reference.loss.item()) < 1e-5
    for name, grad in grads.items():
        assert relative_error(model.get_parameter(name).grad, grad) < 1e-4, name


def _check_generate_attentions(output, batch, prompt, new_tokens, config):
    """GenerationTesterMixin._check_attentions_for_generate: one tuple per step, one tensor per layer,
    (B, H, new queries, keys so far)."""
    assert len(output.attentions) == new_tokens
    keys = prompt
    for step, per_layer in enumerate(output.attentions):
        assert len(per_layer) == config.num_hidden_layers
        queries = prompt if step == 0 else 1
        keys = prompt if step == 0 else keys + 1
        for probs in per_layer:
            assert probs.shape == (batch, config.num_attention_heads, queries, keys)


@pytest.mark.parametrize("kinds", ["full", "mixed"])
def test_generate_returns_attentions_for_greedy_assisted_and_prompt_lookup(kinds):
    model = _model(KINDS[kinds], initializer_range=0.5)
    ids = torch.randint(3, 128, (1, 7))
    common = dict(do_sample=False, pad_token_id=0, max_new_tokens=6, return_dict_in_generate=True,
                  output_attentions=True)  # fmt: skip
    greedy = model.generate(ids, **common)
    _check_generate_attentions(greedy, 1, 7, 6, model.config)
    reference = model.generate(ids, do_sample=False, pad_token_id=0, max_new_tokens=6)
    assert torch.equal(greedy.sequences, reference)  # asking for attentions changes no token
    assistant = _model(KINDS[kinds], initializer_range=0.5)
    torch.manual_seed(3)
    assistant.model.embed_tokens.weight.data.normal_(std=0.5)  # a different draft model: some drafts rejected
    for extra in (dict(assistant_model=assistant), dict(prompt_lookup_num_tokens=2)):
        out = model.generate(ids, **common, **extra)
        assert torch.equal(out.sequences, reference), extra
        assert len(out.attentions) == 6  # one entry per new token, as for greedy search
        for per_layer in out.attentions:
            assert len(per_layer) == model.config.num_hidden_layers
            assert all(p.dim() == 4 and p.shape[:2] == (1, model.config.num_attention_heads) for p in per_layer)


# --- static cache and torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("kinds", ["full", "mixed"])
def test_static_cache_generates_the_dynamic_cache_tokens(kinds):
    model = _model(KINDS[kinds], initializer_range=0.5)
    ids, mask = _left_padded(batch=2, length=9, pad=3)
    common = dict(attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=8)
    reference = model.generate(ids, **common)
    assert len(set(reference[1, 9:].tolist())) > 2  # a meaningful reference
    static = model.generate(ids, cache_implementation="static", **common)
    assert torch.equal(static, reference)


def test_compiled_model_generates_the_eager_tokens_and_fullgraph_is_declared_honestly():
    """A torch.compile'd forward (dynamo; the "eager" backend keeps the CPU test short) generates exactly the eager
    tokens with a static cache. `_can_compile_fullgraph` is False, and truly so: the forward has data-dependent
    branches (padding, packed documents, the cache length), which fullgraph compilation refuses; so generate() does
    not auto-compile it, as it would Llama."""
    model = _model(KINDS["mixed"], initializer_range=0.5)
    assert model._can_compile_fullgraph is False
    ids = torch.randint(3, 128, (1, 7))
    common = dict(do_sample=False, pad_token_id=0, max_new_tokens=5, cache_implementation="static")
    reference = model.generate(ids, **common)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager")
    assert torch.equal(model.generate(ids, **common), reference)
    torch._dynamo.reset()
    full = torch.compile(RevformerForCausalLM.forward.__get__(model), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"attention_mask\.all\(\)"):  # the padding check, a data-dependent branch
        full(ids, attention_mask=torch.ones_like(ids))
    torch._dynamo.reset()


# --- packed documents (padding-free position_ids) ----------------------------------------------------------------


def _packed(lengths=(7, 12, 5), rows=1):
    docs = [torch.randint(3, 128, (1, n)) for n in lengths * rows]
    ids = torch.cat(docs, 1).view(rows, -1)
    position_ids = torch.cat([torch.arange(n) for n in lengths * rows]).view(rows, -1)
    return docs, ids, position_ids


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("kinds", sorted(KINDS))
def test_packed_documents_do_not_see_each_other(kinds, implementation):
    """With position_ids restarting at each document (transformers' padding-free convention), every kernel gives
    each document exactly the logits it gets alone; without them the documents see each other."""
    model = _model(KINDS[kinds], attn_implementation=implementation)
    docs, ids, position_ids = _packed(rows=2)
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids).logits
        alone = torch.cat([model(d).logits for d in docs], 1).view(2, ids.shape[1], -1)
        joined = model(ids).logits
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(joined[:, 7:], alone[:, 7:], atol=1e-3)


@pytest.mark.parametrize("reversible", [True, False])
@pytest.mark.parametrize("kinds", ["full", "mixed"])
def test_packed_loss_and_gradients_equal_documents_run_separately(kinds, reversible):
    """Training on a packed row (labels -100 at each document's first token, as DataCollatorWithFlattening makes
    them) gives the token-weighted loss and gradients of the documents run one by one."""
    model = _model(KINDS[kinds], reversible=reversible).train()
    if kinds == "mixed":  # lsh draws fresh rotations per training forward: its fixed eval ones make runs comparable
        model.model.layers[2].attention.training = False
    docs, ids, position_ids = _packed()
    labels = ids.clone()
    labels[position_ids == 0] = -100
    model.zero_grad()
    packed = model(ids, position_ids=position_ids, labels=labels).loss
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total, count = 0.0, 0
    for d in docs:
        n = d.shape[1] - 1
        loss = model(d, labels=d).loss * n
        loss.backward()
        total, count = total + loss.item(), count + n
    assert abs(packed.item() - total / count) < 1e-5
    for name, grad in packed_grads.items():
        assert relative_error(grad, model.get_parameter(name).grad / count) < 1e-4, name


# --- tokenizer folder -------------------------------------------------------------------------------------------


def test_saved_tokenizer_knows_the_model_length_and_autotokenizer_loads_it_without_a_prompt(tmp_path):
    """The trainer's model folder: tokenizer_config.json says model_max_length = max_position_embeddings (a fresh
    tokenizer says 1e30), and AutoTokenizer.from_pretrained(folder) loads the same tokenizer in a fresh process,
    asking nothing. transformers 5.24's AutoTokenizer reads the folder's config.json first, whose auto_map names
    revformer's config code: with revformer imported (its Auto classes registered) nothing is asked; without it,
    trust_remote_code=False loads the tokenizer without asking (with neither, transformers prompts for the config
    code, as for any custom-code model)."""
    import json
    import subprocess
    import sys

    from accelerate import Accelerator

    from revformer.config import load_run_config
    from revformer.tokenizer import byte_tokenizer
    from revformer.trainer import save_model_folder

    run = load_run_config(None, ["--data.block_size", "64"])
    tokenizer = byte_tokenizer()
    assert tokenizer.model_max_length > 1e20
    save_model_folder(Accelerator(cpu=True), _model(), tokenizer, run, tmp_path, {})
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 256
    text = "def f(x):\n    return x  # é"
    expected = byte_tokenizer()(text)["input_ids"]
    for prelude, kwargs in (("import revformer", ""), ("", "trust_remote_code=False")):
        code = (
            f"{prelude}\nfrom transformers import AutoTokenizer\n"
            f"t = AutoTokenizer.from_pretrained({str(tmp_path)!r}, {kwargs})\n"
            f"print(t.model_max_length, t({text!r})['input_ids'])"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=120, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "Do you wish to run the custom code" not in done.stdout + done.stderr
        assert done.stdout.strip() == f"256 {expected}"



@pytest.mark.parametrize("kinds", sorted(KINDS))
def test_padding_free_batch_from_transformers_collator_matches_the_padded_batch(kinds):
    """As ModelTesterMixin's padding-free test: a left-padded batch and the same sequences flattened by
    DataCollatorWithFlattening (position_ids, no attention_mask) give the same logits and loss."""
    from transformers import DataCollatorWithFlattening

    model = _model(KINDS[kinds])
    ids, mask = _left_padded(batch=3, length=18, pad=6)
    mask[2, :3] = 0
    features = [{"input_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
    flat = DataCollatorWithFlattening(return_tensors="pt")(features)
    labels = ids.masked_fill(~mask.bool(), -100)
    labels[torch.arange(3), mask.argmax(-1)] = -100  # a first token has no prediction (the collator's -100)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, labels=labels)
        free = model(flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"])
    torch.testing.assert_close(free.logits[0], padded.logits[mask.bool()], rtol=1e-5, atol=1e-5)
    assert abs(free.loss.item() - padded.loss.item()) < 1e-5


# --- packing with document boundaries in the data pipeline and the trainer ---------------------------------------


def test_document_position_ids_restart_after_every_eos():
    from revformer.data import document_position_ids

    ids = torch.randint(3, 128, (3, 40))
    ids[0, [5, 6, 20]] = 2
    ids[1, -1] = 2
    ids[2, 0] = 2
    expected = torch.zeros_like(ids)
    for b in range(3):
        position = 0
        for t in range(40):
            expected[b, t] = position
            position = 0 if ids[b, t] == 2 else position + 1
    assert torch.equal(document_position_ids(ids, 2), expected)


def test_evaluation_keeps_attention_inside_documents_as_training_does():
    """`evaluate` (the trainer's and scripts/evaluate.py's number) scores packed blocks with position_ids restarting
    after each EOS when data.document_attention is on (the default), i.e. the model's no-cross-document attention;
    off, the documents of a block see each other."""
    from accelerate import Accelerator
    from datasets import Dataset

    from revformer.config import load_run_config
    from revformer.data import document_position_ids
    from revformer.trainer import evaluate

    assert load_run_config(None, []).data.document_attention is True
    model = _model(KINDS["mixed"])  # eos_token_id = 2
    ids = torch.randint(3, 128, (4, 32))
    ids[:, [9, 21]] = 2
    blocks = Dataset.from_dict({"input_ids": ids.tolist()})

    def reference(position_ids):
        model.eval()  # evaluate() leaves the model in training mode
        with torch.no_grad():
            logits = model(ids, position_ids=position_ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()

    accelerator = Accelerator(cpu=True)
    with_documents = evaluate(model, blocks, accelerator, batch_size=2)["eval/loss"]
    without = evaluate(model, blocks, accelerator, batch_size=2, document_attention=False)["eval/loss"]
    assert abs(with_documents - reference(document_position_ids(ids, 2))) < 1e-5
    assert abs(without - reference(None)) < 1e-5
    assert abs(with_documents - without) > 1e-4
