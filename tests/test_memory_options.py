"""The memory options (chunked feed-forward, chunked loss) against their unchunked references, and what they cost."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import relative_error, tiny_config
from revformer import RevformerConfig, RevformerForCausalLM
from revformer.loss import causal_lm_loss
from revformer.reversible import chunked, upstream_gradient


def grads_of(model: RevformerForCausalLM, ids: torch.Tensor, seed: int = 0, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def twin(model: RevformerForCausalLM, **changes) -> RevformerForCausalLM:
    """The same weights under a config that differs by `changes`."""
    other = RevformerForCausalLM(RevformerConfig(**{**model.config.to_dict(), **changes})).train()
    other.load_state_dict(model.state_dict())
    return other


def test_defaults_chunk_long_sequences_only():
    config = RevformerConfig()
    assert config.chunk_size_feed_forward > 0 and config.loss_chunk_size > 0
    model = RevformerForCausalLM(tiny_config()).eval()
    short = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert model(short, labels=short).logits is not None  # one chunk: logits are returned as usual


# The options converted Llama-family models bring (with each block-level coupling: parametrized below).
CONVERTED = dict(num_key_value_heads=2, head_dim=12, qkv_bias=True, qk_norm=True,
                 tie_word_embeddings=False)


@pytest.mark.parametrize("reversible", [True, False])
@pytest.mark.parametrize("stream_dtype", ["float32", "fixed_point"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("converted", [None, "sublayer", "bdia"])
def test_chunked_options_give_the_unchunked_gradients(reversible, stream_dtype, autocast, converted):
    torch.manual_seed(0)
    # Chunks that do not divide the sequence (T = 45, B*T = 90) and a mixed attention stack, `full` last: query
    # chunks change bf16 rounding, which would move lsh's discontinuous buckets in a later layer.
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=3, attention_layers=["local", "lsh", "full"],
                                             local_chunk_length=8, lsh_chunk_length=8, lsh_num_buckets=4,
                                             stream_dtype=stream_dtype, reversible=reversible,
                                             chunk_size_feed_forward=7, chunk_size_attention=6, loss_chunk_size=13,
                                             **({**CONVERTED, "coupling": converted} if converted else {}))).train()
    reference = twin(model, chunk_size_feed_forward=0, chunk_size_attention=0, loss_chunk_size=0)
    ids = torch.randint(0, 128, (2, 45))
    loss, grads = grads_of(model, ids, autocast=autocast)
    ref_loss, ref_grads = grads_of(reference, ids, autocast=autocast)
    tolerance = 2e-2 if autocast else 1e-5  # bf16 sums in a different order per chunk
    assert torch.allclose(loss, ref_loss, rtol=tolerance)
    errors = {n: relative_error(grads[n], ref_grads[n]) for n in ref_grads}
    assert max(errors.values()) <= tolerance, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_reversible_chunked_with_dropout_matches_plain():
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=4, hidden_dropout=0.1, attention_dropout=0.1,
                                             chunk_size_feed_forward=9, loss_chunk_size=17)).train()
    plain = twin(model, reversible=False)
    ids = torch.randint(0, 128, (2, 40))
    loss, grads = grads_of(model, ids, seed=3)
    ref_loss, ref_grads = grads_of(plain, ids, seed=3)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert max(relative_error(grads[n], ref_grads[n]) for n in grads) <= 1e-5


@pytest.mark.parametrize("coupling", ["sublayer", "bdia"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("inputs", ["plain", "left_padding", "packed_documents"])
@pytest.mark.parametrize("grouped", [False, True])
def test_query_chunked_attention_gives_the_whole_sequence_kernel(coupling, kernel, inputs, grouped):
    """Attention a few queries at a time (chunks that do not divide T = 23), reversible (a bdia layer's attention and
    feed-forward then run as one call) and plain, against the whole-sequence kernel: loss, every gradient, and the
    logits without grad; with padding, packed documents, grouped key/value heads, either kernel."""
    torch.manual_seed(0)
    options = dict(num_key_value_heads=2, qk_norm=True, qkv_bias=True) if grouped else {}
    streams = "fixed_point" if coupling == "bdia" else "float32"
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=3, coupling=coupling, stream_dtype=streams,
                                             chunk_size_attention=5, chunk_size_feed_forward=7, **options)).train()
    model.set_attn_implementation(kernel)
    reference = twin(model, chunk_size_attention=0, reversible=False)
    reference.set_attn_implementation(kernel)
    ids = torch.randint(3, 128, (2, 23))
    kwargs = {}
    if inputs == "left_padding":
        kwargs["attention_mask"] = torch.ones_like(ids)
        kwargs["attention_mask"][1, :6] = 0
    elif inputs == "packed_documents":
        kwargs["position_ids"] = torch.cat([torch.arange(9), torch.arange(14)]).expand(2, -1)
    results = {}
    for name, m in (("chunked", model), ("whole", reference)):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # bdia's gamma draws
        loss = m(ids, labels=ids, **kwargs).loss
        loss.backward()
        with torch.no_grad():
            torch.manual_seed(1)
            logits = m(ids, **kwargs).logits
        results[name] = loss.detach(), logits, {n: p.grad for n, p in m.named_parameters()}
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = results["chunked"], results["whole"]
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    errors = {n: relative_error(grads[n], ref_grads[n]) for n in ref_grads}
    assert max(errors.values()) <= 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def attention_step_peak_mib(chunk_size_attention: int) -> float:
    """Peak memory (MiB) allocated during one attention layer's forward and backward at 1024 tokens, replayed from
    torch.profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    from revformer.modeling_revformer import RevformerAttention, RevformerRotaryEmbedding

    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         chunk_size_attention=chunk_size_attention)
    attention = RevformerAttention(config, 0).train()
    x = torch.randn(1, 1024, 64, requires_grad=True)
    cos, sin = RevformerRotaryEmbedding(config)(x, torch.arange(1024)[None])
    grad = torch.ones_like(x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        attention(x, cos, sin).backward(grad)

    def tree(events):
        for event in events:
            yield event
            yield from tree(event.children)

    allocations = [e.extra_fields for e in tree(prof.profiler.kineto_results.experimental_event_tree())
                   if e.tag == _EventType.Allocation]
    before = allocations[0].total_allocated - allocations[0].alloc_size
    return (max(a.total_allocated for a in allocations) - before) / 2**20


def test_query_chunks_hold_no_whole_sequence_queries_outputs_or_their_gradients():
    """Whole-sequence attention holds queries, keys, values, outputs and all their gradients at its backward; in
    query chunks, only keys, values, their gradients and x's gradient are whole (about half, at this shape)."""
    whole, chunked_peak = attention_step_peak_mib(0), attention_step_peak_mib(128)
    assert chunked_peak < 0.75 * whole, (chunked_peak, whole)


def count_chunk_calls(model: RevformerForCausalLM) -> dict[str, int]:
    calls = {"n": 0}
    for block in model.model.layers:
        original = block.feed_forward.forward_chunk

        def counted(x, *args, original=original):
            calls["n"] += 1
            return original(x, *args)

        block.feed_forward.forward_chunk = counted
    return calls


@pytest.mark.parametrize("coupling", ["sublayer", "bdia"])
def test_reversible_engine_gets_feed_forward_gradients_without_recomputing(coupling):
    """In the engine's re-run the announced gradient lets each chunk compute output and gradients in one call; the
    plain path recomputes each chunk in backward instead. With the bdia coupling the feed-forward is inside the
    engine's sublayer (a whole layer, its output scaled by 1 + gamma for layers after the first), and still fuses."""
    model = RevformerForCausalLM(tiny_config(num_hidden_layers=2, chunk_size_feed_forward=8, coupling=coupling)).train()
    ids = torch.randint(0, 128, (2, 48))  # 6 chunks per layer
    calls = count_chunk_calls(model)
    model(ids, labels=ids).loss.backward()
    assert calls["n"] == 2 * 6 * 2  # forward + re-run, per chunk and layer: nothing recomputed
    calls["n"] = 0
    model.config.reversible = False
    model(ids, labels=ids).loss.backward()
    assert calls["n"] == 2 * 6 * 2  # forward + recompute in backward


def test_chunked_falls_back_to_recompute_when_the_announced_gradient_is_not_the_one_that_arrives():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    params = list(layer.parameters())
    x = torch.randn(2, 10, 4, requires_grad=True)
    announced, actual = torch.randn(2, 10, 4), torch.randn(2, 10, 4)
    with upstream_gradient(announced):
        out = chunked(lambda t: torch.tanh(layer(t)), x, 3, params)
    grads = torch.autograd.grad(out, [x, *params], actual)
    ref = torch.autograd.grad(torch.tanh(layer(x)), [x, *params], actual)
    for got, want in zip(grads, ref):
        assert torch.allclose(got, want, atol=1e-6)


def test_no_grad_chunked_loss_makes_no_gradient_calls(monkeypatch):
    torch.manual_seed(0)
    hidden, head = torch.randn(3, 50, 16), torch.nn.Linear(16, 40, bias=False)
    labels = torch.randint(0, 40, (3, 50))
    expected = causal_lm_loss(hidden, head, labels, logits=head(hidden)).detach()
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    with torch.no_grad():
        loss = causal_lm_loss(hidden, head, labels, chunk_size=7)
    assert calls == []
    assert torch.allclose(loss, expected, rtol=1e-6)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func), tuple(out.shape) if isinstance(out, torch.Tensor) else ()))
        return out


def test_unchunked_loss_runs_the_lm_head_once():
    model = RevformerForCausalLM(tiny_config(loss_chunk_size=0)).train()
    ids = torch.randint(0, 128, (2, 30))
    with CountOps() as ops:
        out = model(ids, labels=ids)
    vocab_matmuls = [op for op in ops.ops if op[0].startswith("aten.mm") and op[1][-1] == 128]
    assert len(vocab_matmuls) == 1 and out.logits is not None
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, rtol=1e-5)


def test_chunked_loss_casts_the_head_weight_once_under_autocast():
    model = RevformerForCausalLM(tiny_config(loss_chunk_size=8)).train()
    ids = torch.randint(0, 128, (2, 40))  # 10 chunks
    weight_shape = tuple(model.lm_head.weight.shape)
    with CountOps() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    casts = [op for op in ops.ops if op[0].startswith("aten._to_copy") and op[1] == weight_shape]
    # One cast for the chunked head; the embedding lookup reads the fp32 weight and makes none.
    assert len(casts) == 1
    loss.backward()


def test_eval_forward_builds_no_cache_but_generation_uses_one():
    model = RevformerForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        assert model(ids).cache is None
        assert model(ids, use_cache=True).cache.get_seq_length() == 12
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("announced", [False, True])
@pytest.mark.parametrize("as_view", [False, True])
def test_chunked_into_adds_in_place_with_the_gradients_of_the_sum(announced, as_view):
    """`chunked(fn, x, into=s)` is `s + fn(x)`, written over `s` (the bdia layer's sum) unless `s` is a view (as FSDP2
    hands a module's inputs on), with the gradients of `s + fn(x)` for s, x and the parameters, fused or recomputed."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    params = list(layer.parameters())
    x, base = torch.randn(2, 10, 4, requires_grad=True), torch.randn(2, 10, 4, requires_grad=True)
    grad = torch.randn(2, 10, 4)

    def fn(t):
        return torch.tanh(layer(t))

    into = base * 1.0
    if as_view:
        into = into.view(2, 10, 4)
    with upstream_gradient(grad) if announced else contextlib.nullcontext():
        out = chunked(fn, x, 3, params, into=into)
    assert (out is into) != as_view  # in place, unless a view
    got = torch.autograd.grad(out, [base, x, *params], grad)
    expected_out = base + fn(x)
    want = torch.autograd.grad(expected_out, [base, x, *params], grad)
    assert torch.allclose(out, expected_out, atol=1e-6)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)
