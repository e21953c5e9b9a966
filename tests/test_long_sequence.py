"""Long-sequence pieces inside the model: per-layer kernels, chunked feed-forward, chunked LM loss, generation."""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error, tiny_config
from revformer import RevformerForCausalLM

KERNEL_CONFIGS = {
    "full": dict(attention_layers="full"),
    "local": dict(attention_layers="local", local_chunk_length=8, local_num_chunks_before=1),
    "lsh": dict(attention_layers="lsh", lsh_num_buckets=4, lsh_num_hashes=2, lsh_chunk_length=8),
    "mixed": dict(attention_layers=["local", "lsh", "full", "lsh"], local_chunk_length=8, lsh_num_buckets=4,
                  lsh_chunk_length=8),
}


def step(model, ids, reversible, seed=0):
    model.config.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same LSH rotations and dropout masks for both paths
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", sorted(KERNEL_CONFIGS))
def test_every_kernel_has_reversible_gradient_parity(kind):
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=4, hidden_dropout=0.1, **KERNEL_CONFIGS[kind]))
    ids = torch.randint(0, 128, (2, 45))  # not a multiple of any chunk
    loss_rev, rev = step(model.train(), ids, True)
    loss_plain, plain = step(model, ids, False)
    assert torch.allclose(loss_rev, loss_plain, rtol=1e-6)
    for name in plain:
        assert relative_error(rev[name], plain[name]) < 1e-5, (kind, name)


def test_chunked_feed_forward_and_chunked_loss_equal_unchunked():
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 50))
    labels = ids.clone()
    labels[1, 10:20] = -100
    reference = RevformerForCausalLM(tiny_config(num_hidden_layers=3))
    chunked = RevformerForCausalLM(tiny_config(num_hidden_layers=3, chunk_size_feed_forward=7, loss_chunk_size=13))
    chunked.load_state_dict(reference.state_dict())
    for reversible in (True, False):
        results = []
        for model in (reference, chunked):
            model.config.reversible = reversible
            model.zero_grad(set_to_none=True)
            out = model(ids, labels=labels)
            out.loss.backward()
            results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (ref_out, ref_grads), (chunk_out, chunk_grads) = results
        assert chunk_out.logits is None  # full-sequence logits never built
        assert torch.allclose(chunk_out.loss, ref_out.loss, rtol=1e-6)
        for name in ref_grads:
            assert relative_error(chunk_grads[name], ref_grads[name]) < 1e-5, (reversible, name)


def test_chunked_feed_forward_never_runs_on_the_whole_sequence():
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(chunk_size_feed_forward=8)).train()
    widths = []
    for block in model.model.layers:
        block.feed_forward.up_proj.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    ids = torch.randint(0, 128, (1, 30))
    model(ids, labels=ids).loss.backward()  # forward and the reversible backward's re-run
    assert widths and max(widths) <= 8


@pytest.mark.parametrize("kind", ["full", "local", "mixed"])
def test_no_future_token_leaks(kind):
    torch.manual_seed(0)
    overrides = dict(KERNEL_CONFIGS[kind])
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=4, **overrides)).eval()
    ids = torch.randint(0, 128, (1, 40))
    t = 23
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 128
    with torch.no_grad():
        torch.manual_seed(1)
        before = model(ids).logits
        torch.manual_seed(1)
        after = model(changed).logits
    torch.testing.assert_close(before[:, :t], after[:, :t], atol=1e-5, rtol=0)  # lsh: sorted blocks round differently
    assert not torch.allclose(before[:, t:], after[:, t:])


@pytest.mark.parametrize("kind", ["full", "local"])
def test_cached_generation_is_exact_for_exact_kernels(kind):
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(**KERNEL_CONFIGS[kind])).eval()
    prompt = torch.randint(3, 128, (2, 11))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_lsh_generation_with_cache_equals_the_full_forward():
    torch.manual_seed(0)
    lsh = RevformerForCausalLM(tiny_config(**KERNEL_CONFIGS["lsh"])).eval()
    exact = lsh  # eval mode: fixed rotations, so cached decoding reproduces the full forward (more in test_attention)
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        cache, stepwise = None, []
        for t in range(ids.shape[1]):  # token by token: every step after the first decodes against the cache
            out = lsh(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            stepwise.append(out.logits[:, -1])
        reference = exact(ids).logits
    assert torch.allclose(torch.stack(stepwise, dim=1), reference, atol=1e-5)
    prompt = ids[:, :9]
    generated = lsh.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 19)
