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
