"""Hugging Face conventions that tools built on transformers rely on (issue 14), tested as behaviour.

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


def test_activation_checkpointing_on_reversible_path_warns_and_reports_false():
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config()).train()
    ids = torch.randint(3, 128, (2, 16))
    reference = _grads(model, ids)
    calls = []
    model.model.layers[0].attention.register_forward_hook(lambda *_: calls.append(1))
    logger = logging.get_logger(modeling_revformer.__name__)
    with CaptureLogger(logger) as captured:
        model.activation_checkpointing_enable()
    assert "no effect on a reversible revformer" in captured.out
    assert not model.is_activation_checkpointing
    with pytest.warns(FutureWarning):  # the deprecated alias answers the same
        assert not model.is_gradient_checkpointing
    grads = _grads(model, ids)
    assert len(calls) == 2  # the engine's forward and its one re-run in backward: nothing checkpoints on top
    for name, grad in reference.items():
        assert relative_error(grads[name], grad) < 1e-6, name
    # The flag still takes effect if the model is switched to the plain path.
    model.config.reversible = False
    assert model.is_activation_checkpointing


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
    `linear` does not; on an input past max_position_embeddings `dynamic` differs too."""
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
    with pytest.raises(ValueError, match="rope_type': 'yarn'"):  # past the limit without scaling: names the fix
        logits(None, ids_long)
    dynamic_long = logits({"rope_type": "dynamic", "factor": 4.0}, ids_long)  # dynamic extends the limit
    default_long = logits(None, torch.cat([ids_long[:, :64]], dim=1))
    assert not torch.allclose(dynamic_long[:, :64], default_long, atol=1e-5)


def test_yarn_runs_a_short_trained_model_four_times_longer(tmp_path):
    """A model pretrained at 64 positions, loaded with yarn x4 and max_position_embeddings=256, runs and fine-tunes at
    256 tokens, with its weights unchanged (RoPE has none) and the yarn frequencies equal transformers' own."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(max_position_embeddings=64))
    model.save_pretrained(tmp_path)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    long = RevformerForCausalLM.from_pretrained(tmp_path, max_position_embeddings=256, rope_parameters=yarn)
    assert long.config.rope_parameters["rope_theta"] == 10000.0
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
