"""The GPU path: every test body runs on the CPU in the normal suite and again on CUDA when a GPU is present.

The `device` fixture is parametrized `cpu` / `cuda`; the `cuda` cases carry the `gpu` marker and are skipped
without CUDA (`python -m pytest -m gpu tests/test_cuda.py` runs only them). Running the same bodies on the CPU in
CI means the first minutes on a GPU go to measuring, not to debugging the tests.

Covered: reversible vs plain gradients with dropout and LSH rotations (CPU and CUDA RNG replay) in fp32 and under
bf16 autocast; exact reconstruction with fixed-point streams at 48 layers (float streams: error reported); every
attention kernel against a dense float64 reference, with and without padding; which SDPA backend each call uses
(never the math fallback where a fused kernel exists); fp16 training with GradScaler; activation memory flat in
depth (`torch.cuda.max_memory_allocated` on CUDA, MemTracker on CPU); cached generation.

Measured values are printed and, when `REVFORMER_TEST_REPORT` names a file, appended to it as JSON lines
(`python -m benchmarks gpu_check` collects them into the GPU results).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import KERNELS, ROOT, relative_error, tiny_config
from revformer import RevformerForCausalLM
from revformer.attention import LSH_SELF_MASK_VALUE, lsh_buckets

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]),
]
REPORT_ENV = "REVFORMER_TEST_REPORT"
# Fused SDPA kernels per device type: restricting SDPA to these makes the math fallback raise instead of running.
FUSED = {"cpu": [SDPBackend.FLASH_ATTENTION],
         "cuda": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]}


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def report(request):
    """`report(**values)`: print a measurement and append it to $REVFORMER_TEST_REPORT (JSON lines) if set."""

    def write(**values) -> None:
        record = {"test": request.node.nodeid, **values}
        print(json.dumps(record))
        path = os.environ.get(REPORT_ENV)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return write


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def build(device: torch.device, seed: int = 0, **overrides) -> RevformerForCausalLM:
    torch.manual_seed(seed)
    with device:  # built in place: initializing a large model on the CPU first would take longer than its test
        return RevformerForCausalLM(tiny_config(**overrides)).train()


def gradients(model: RevformerForCausalLM, ids: Tensor, reversible: bool, seed: int, dtype: torch.dtype | None):
    """Loss and every parameter's gradient for one step through the chosen path, RNG seeded identically."""
    model.config.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # seeds the CUDA generators too
    with autocast(ids.device, dtype):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------- reversible vs plain, RNG replay


MIXED = dict(num_hidden_layers=6, attention_layers=["lsh", "local", "full"] * 2, hidden_dropout=0.1,
             attention_dropout=0.1, lsh_num_buckets=4, lsh_chunk_length=8, local_chunk_length=8)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reversible_gradients_match_plain_with_dropout_and_lsh(device, precision, report):
    dtype = torch.bfloat16 if precision == "bf16" else None
    model = build(device, **MIXED)
    ids = torch.randint(3, 128, (2, 64), device=device)
    loss_rev, rev = gradients(model, ids, True, seed=7, dtype=dtype)
    loss_plain, plain = gradients(model, ids, False, seed=7, dtype=dtype)
    errors = {name: relative_error(rev[name], plain[name]) for name in plain}
    worst = max(errors, key=errors.get)
    report(device=device.type, precision=precision, loss_rev=loss_rev.item(), loss_plain=loss_plain.item(),
           max_grad_rel_error=errors[worst], worst_param=worst)
    # Identical dropout masks and LSH rotations in the re-run are what make these agree at all.
    assert abs(loss_rev - loss_plain) <= 1e-6 * abs(loss_plain) + (1e-3 if dtype else 0.0)
    # fp32: the only difference is the fp32 reconstruction (plus atomics in CUDA attention backward).
    # bf16: an 8-bit mantissa; both paths agree to a few percent (as on CPU in test_reversible.py).
    tolerance = 5e-2 if dtype else (1e-4 if device.type == "cuda" else 1e-5)
    assert errors[worst] <= tolerance, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    # Randomness is really in play: another seed gives another loss.
    assert gradients(model, ids, True, seed=8, dtype=dtype)[0] != loss_rev


def test_backward_leaves_the_device_rng_stream_where_plain_autograd_does(device):
    model = build(device, **MIXED)
    ids = torch.randint(3, 128, (2, 64), device=device)
    after = {}
    for reversible in (True, False):
        gradients(model, ids, reversible, seed=3, dtype=None)
        after[reversible] = torch.rand(16, device=device)
    assert torch.equal(after[True], after[False])


def test_fixed_point_reconstruction_is_exact_at_48_layers_under_bf16(device, report):
    """48 layers, dropout and LSH under bf16 autocast: fixed-point streams rebuild the input bit for bit; float
    streams drift (reported). Block weights are scaled up as training grows them, which is what amplifies drift."""
    model = build(device, num_hidden_layers=48, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                  attention_layers=["full", "local", "lsh"] * 16, hidden_dropout=0.1, lsh_num_buckets=4,
                  lsh_chunk_length=8, local_chunk_length=8, stream_dtype="fixed_point")
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    ids = torch.randint(3, 128, (1, 32), device=device)
    from revformer.reversible import stream_arithmetic

    errors = {}
    for stream_dtype in ("fixed_point", "float32"):
        model.model.streams = stream_arithmetic(stream_dtype)
        with autocast(device, torch.bfloat16):
            errors[stream_dtype] = model.model.reconstruction_error(ids)
    model.model.streams = stream_arithmetic("fixed_point")
    _, rev = gradients(model, ids, True, seed=5, dtype=torch.bfloat16)
    _, plain = gradients(model, ids, False, seed=5, dtype=torch.bfloat16)
    grad_error = max(relative_error(rev[n], plain[n]) for n in plain)
    report(device=device.type, layers=48, reconstruction_error_fixed_point=errors["fixed_point"],
           reconstruction_error_float32=errors["float32"], fixed_point_grad_rel_error_vs_plain=grad_error)
    assert errors["fixed_point"] == 0.0, errors
    assert errors["float32"] > 0.0, errors  # the measure can fail: float streams do not invert exactly
    # Same streams, same kernels: equal up to the order of atomic adds in CUDA attention backward (0 on CPU).
    assert grad_error <= (1e-2 if device.type == "cuda" else 1e-6)


# ------------------------------------------------------------------------------- attention kernels vs reference


def kernel_config(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{"local_chunk_length": 8, "local_num_chunks_before": 1, "lsh_num_buckets": 4,
                              "lsh_num_hashes": 2, "lsh_chunk_length": 8, **overrides})


def dense_reference(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float, self_value: float | None = None):
    """Masked softmax attention in the inputs' dtype; rows with no allowed key give 0. Returns (out, logsumexp)."""
    t = q.shape[-2]
    scores = scale * q @ k.transpose(-1, -2)
    if self_value is not None:
        scores = scores.masked_fill(torch.eye(t, dtype=torch.bool, device=q.device), self_value)
    scores = scores.masked_fill(~allowed, -1e30)
    lse = scores.logsumexp(-1, keepdim=True)
    return torch.exp(scores - lse) * allowed.any(-1, keepdim=True) @ v, lse


def reference_attention(kind: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                        config: SimpleNamespace, buckets: Tensor | None = None) -> Tensor:
    """What each kernel must compute, densely, in float64: the allowed (query, key) pairs spelled out."""
    t = q.shape[-2]
    pos = torch.arange(t, device=q.device)
    allowed = (pos[None, :] <= pos[:, None])[None, None]  # causal, (1, 1, T, T)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if kind in ("eager", "full"):
        return dense_reference(q, k, v, allowed, scale)[0]
    real = torch.ones(1, t, dtype=torch.bool, device=q.device) if mask is None else mask  # (B | 1, T)
    if kind == "local":  # chunks counted in real tokens (padding does not move them)
        chunk = (real.long().cumsum(-1) - 1) // config.local_chunk_length  # (B | 1, T)
        near = chunk[:, None, None, :] >= chunk[:, None, :, None] - config.local_num_chunks_before
        return dense_reference(q, k, v, allowed & near, scale)[0]
    # lsh: shared QK (keys normalized); in each round a real query sees the lsh_chunk_length most recent earlier real
    # tokens of its bucket, and itself; one softmax over the union of the rounds' keys.
    k = F.normalize(k, dim=-1, eps=1e-6)
    key_real = real[:, None, None, :]  # (B | 1, 1, 1, T)
    seen = torch.eye(t, dtype=torch.bool, device=q.device) & real[:, None, :, None]  # itself, if real
    for r in range(buckets.shape[2]):
        same = (buckets[:, :, r, :, None] == buckets[:, :, r, None, :]) & key_real  # (B, H, T, T)
        in_bucket_rank = (same & (pos[None, :] <= pos[:, None])).sum(-1)  # real same-bucket tokens up to each one
        between = in_bucket_rank[..., :, None] - in_bucket_rank[..., None, :]  # of them in (key, query]
        seen = seen | (same & allowed & (between <= config.lsh_chunk_length))
    return dense_reference(q, k, v, allowed & seen, scale, LSH_SELF_MASK_VALUE)[0]


@pytest.mark.parametrize("kind", ["eager", "full", "local", "lsh"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_kernel_matches_dense_reference(device, kind, padded, precision, report):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    b, h, t, d = 2, 2, 64, 16
    g = torch.Generator().manual_seed(0)
    q64, k64, v64 = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3))
    if kind == "lsh":
        k64 = q64
    mask = None
    if padded:  # left padding: row 1 starts with 5 pad tokens
        mask = (torch.arange(t)[None, :] >= torch.tensor([0, 5])[:, None]).to(device)
    q, k, v = (x.to(device, dtype).requires_grad_() for x in (q64, k64, v64))
    config, scale = kernel_config(), d**-0.5
    rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    out = KERNELS[kind](q, q if kind == "lsh" else k, v, key_padding_mask=mask, dropout_p=0.0, scale=scale,
                        config=config)
    buckets = None
    if kind == "lsh":  # the kernel's own draw, replayed: the reference hashes with the same rotations
        (torch.cuda.set_rng_state(rng, device) if device.type == "cuda" else torch.set_rng_state(rng))
        k_unit = F.normalize(q.detach().float(), dim=-1, eps=1e-6).to(dtype)
        buckets = lsh_buckets(k_unit, config.lsh_num_hashes, config.lsh_num_buckets).cpu()
        assert buckets.unique().numel() > 1  # the hashing is really exercised
    ref64 = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]  # the kernel's (rounded) inputs
    if kind == "lsh":  # shared QK: one leaf for queries and keys, as the kernel gets it
        ref64[1] = ref64[0]
    ref = reference_attention(kind, *ref64, None if mask is None else mask.cpu(), scale, config, buckets)
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    error = (out.detach().cpu().double() - ref.detach()).abs().max().item()
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    inputs = (q, v) if kind == "lsh" else (q, k, v)
    got = torch.autograd.grad(out, inputs, upstream.to(device, dtype))
    want = torch.autograd.grad(ref, [ref64[0], ref64[2]] if kind == "lsh" else ref64, upstream)
    grad_error = max((a.cpu().double() - w).abs().max().item() / w.abs().max().item() for a, w in zip(got, want))
    report(device=device.type, kind=kind, padded=padded, precision=precision, max_abs_error=error,
           max_grad_rel_error=grad_error)
    assert out.dtype == dtype and out.shape == (b, h, t, d)
    assert error <= tolerance
    assert grad_error <= 4 * tolerance


# ------------------------------------------------------------------------------------------------- SDPA backends


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Record the backend torch picks for every scaled_dot_product_attention call (and still run it)."""
    calls: list[dict] = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)
        calls.append({"backend": SDPBackend(choice).name, "seq": k.shape[-2], "masked": attn_mask is not None,
                      "dtype": str(q.dtype).removeprefix("torch."), "dropout": dropout_p})
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("kind", ["full", "local"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sdpa_uses_a_fused_kernel_for_long_sequences(device, kind, padded, dropout, sdpa_calls, report):
    """Flash (no mask) or memory-efficient (mask) on CUDA, never math; torch's CPU flash kernel takes masks but
    not dropout, so on CPU only dropout-free calls must be fused. Restricting SDPA to the fused backends turns a
    math fallback into an error, in forward and in backward."""
    cuda = device.type == "cuda"
    b, h, t, d = (1, 8, 8192, 64) if cuda else (1, 2, 1024, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = (torch.arange(t, device=device)[None, :] >= 100) if padded else None
    config = kernel_config(local_chunk_length=256 if cuda else 128)
    run = lambda: KERNELS[kind](q, k, v, key_padding_mask=mask, dropout_p=dropout, scale=d**-0.5,  # noqa: E731
                                config=config)
    must_fuse = cuda or dropout == 0.0
    run().float().square().mean().backward()  # default dispatch: record what torch picks
    report(device=device.type, kind=kind, padded=padded, dropout=dropout, seq=t, dtype=str(dtype),
           backends=sorted({c["backend"] for c in sdpa_calls}))
    assert sdpa_calls and all(c["seq"] >= (256 if kind == "local" else t) for c in sdpa_calls)
    if must_fuse:
        assert all(c["backend"] != "MATH" for c in sdpa_calls), sdpa_calls
        with sdpa_kernel(FUSED[device.type]):
            run().float().square().mean().backward()


def test_model_trains_long_sequences_without_the_math_fallback(device, sdpa_calls, report):
    """A reversible full + local model, forward and backward (with its re-runs) under bf16 autocast, with SDPA
    restricted to fused kernels: a math fallback anywhere would raise (the full layer's masked query chunks too)."""
    cuda = device.type == "cuda"
    seq = 8192 if cuda else 512
    model = build(device, num_hidden_layers=2, attention_layers=["full", "local"], max_position_embeddings=seq,
                  **(dict(hidden_size=256, num_attention_heads=4, intermediate_size=512, local_chunk_length=256)
                     if cuda else dict(local_chunk_length=64)))
    ids = torch.randint(3, 128, (1, seq), device=device)
    with sdpa_kernel(FUSED[device.type]), autocast(device, torch.bfloat16):
        loss = model(ids, labels=ids).loss
    with sdpa_kernel(FUSED[device.type]):
        loss.backward()
    backends = sorted({c["backend"] for c in sdpa_calls})
    report(device=device.type, seq=seq, backends=backends, calls=len(sdpa_calls))
    assert torch.isfinite(loss) and "MATH" not in backends
    # forward + backward re-run: the local layer calls once, the full layer once per chunk of queries (masked)
    chunks = -(-seq // model.config.chunk_size_attention)
    assert len(sdpa_calls) == 2 * (1 + chunks)
    # masked: the full layer's chunks but the first (square: plain causal), and the local layer's windows
    assert sum(c["masked"] for c in sdpa_calls) == 2 * chunks


@pytest.mark.parametrize("coupling", ["sublayer", "bdia"])
def test_query_chunked_attention_gives_the_whole_kernel_gradients(device, coupling, report):
    """`chunk_size_attention` on the device (heads not grouped: what CUDA chunks), through the reversible engine,
    against the whole-sequence kernel on the plain path, fp32."""
    extra = dict(coupling="bdia", stream_dtype="fixed_point") if coupling == "bdia" else {}
    model = build(device, num_hidden_layers=3, chunk_size_attention=16, **extra)
    reference = build(device, num_hidden_layers=3, chunk_size_attention=0, **extra)  # the same seed: same weights
    ids = torch.randint(3, 128, (2, 72), device=device)
    loss, grads = gradients(model, ids, True, seed=1, dtype=None)
    ref_loss, ref_grads = gradients(reference, ids, False, seed=1, dtype=None)
    errors = {name: relative_error(grads[name], ref_grads[name]) for name in ref_grads}
    worst = max(errors, key=errors.get)
    report(device=device.type, coupling=coupling, max_grad_rel_error=errors[worst], worst_param=worst)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert errors[worst] <= (1e-4 if device.type == "cuda" else 1e-5), sorted(errors.items(), key=lambda kv: -kv[1])[:5]


# -------------------------------------------------------------------------------------- fp16 with GradScaler


def test_fp16_training_with_grad_scaler(device, report):
    """fp16 autocast + GradScaler through the reversible engine: an overflowing first scale is detected (step
    skipped, scale backed off, weights untouched), then the loss falls."""
    model = build(device, num_hidden_layers=4, attention_layers=["full", "lsh", "local", "full"], hidden_dropout=0.1,
                  lsh_num_buckets=4, lsh_chunk_length=8, local_chunk_length=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**32, backoff_factor=2.0**-8)
    ids = torch.randint(3, 128, (4, 64), device=device)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses, scales, skipped = [], [], 0
    for step in range(30):
        with autocast(device, torch.float16):
            loss = model(ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        skipped += scaler.get_scale() < scale
        if step == 0:
            assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())  # overflow: step skipped
        losses.append(loss.item())
        scales.append(scale)
    report(device=device.type, first_loss=losses[0], last_loss=losses[-1], skipped_steps=int(skipped),
           final_scale=scaler.get_scale())
    assert skipped >= 1 and scaler.get_scale() < 2.0**32
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


# ------------------------------------------------------------------------------------ activation memory vs depth


def activation_bytes(device: torch.device, num_layers: int, reversible: bool, **sizes) -> int:
    """Peak memory of one forward + backward minus what existed before it and the parameter gradients."""
    model = build(device, num_hidden_layers=num_layers, reversible=reversible, **sizes)
    seq = sizes.get("max_position_embeddings", 256)
    ids = torch.randint(3, 128, (1, seq), device=device)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(ids, labels=ids).loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before - grads
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(ids, labels=ids).loss.backward()
    return tracker.get_tracker_snapshot("peak")[device]["Total"] - 2 * grads  # parameters + their gradients


def test_activation_memory_is_flat_in_depth(device, report):
    cuda = device.type == "cuda"
    depths = (2, 12, 48) if cuda else (2, 8)
    sizes = (dict(hidden_size=512, num_attention_heads=8, intermediate_size=1376, max_position_embeddings=2048,
                  vocab_size=512) if cuda else dict(max_position_embeddings=256))
    rev = {n: activation_bytes(device, n, True, **sizes) for n in depths}
    plain = {n: activation_bytes(device, n, False, **sizes) for n in depths}
    report(device=device.type, activation_mib_reversible={n: v / 2**20 for n, v in rev.items()},
           activation_mib_plain={n: v / 2**20 for n, v in plain.items()})
    assert max(rev.values()) <= 1.05 * min(rev.values()), rev
    assert plain[depths[-1]] > 3 * plain[depths[0]], plain


# ---------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("kinds", [["full", "local"], ["lsh", "full"]])
def test_generation_with_a_cache(device, kinds, report):
    """Each cached decoding step gives the logits of the whole sequence run without a cache (exact kernels); with
    LSH layers the cached path attends exactly over the cache, so it only has to run and stay on the device."""
    model = build(device, attention_layers=kinds, local_chunk_length=8, lsh_num_buckets=4, lsh_chunk_length=8).eval()
    prompt = torch.randint(3, 128, (2, 12), device=device)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape == (2, 32) and out.device.type == device.type
        if "lsh" in kinds:
            return
        full = model(out, use_cache=False).logits  # (B, 32, V)
        step = model(out[:, :12], use_cache=True)
        cached = [step.logits[:, -1]]
        for i in range(12, 31):
            step = model(out[:, i : i + 1], cache=step.cache, use_cache=True)
            cached.append(step.logits[:, -1])
    error = (torch.stack(cached, 1) - full[:, 11:31]).abs().max().item()
    report(device=device.type, kinds=kinds, max_logit_error_cached_vs_full=error)
    assert error <= 1e-4


# ---------------------------------------------- python -m benchmarks gpu_check (benchmarks/suites/gpu_check.py)


def gpu_check_module():
    from benchmarks.suites import gpu_check

    return gpu_check


def test_model_flops_formula_matches_a_flop_count_of_the_plain_step():
    """6N + 12 L d T per token (MFU's numerator) against torch's FLOP counter on a plain forward + backward (the
    reversible re-run is recomputation and is not model FLOPs). Eager attention: explicit, countable matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    gpu_check = gpu_check_module()
    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(reversible=False, attn_implementation="eager")).train()
    seq = 64
    ids = torch.randint(3, 128, (1, seq))
    counter = FlopCounterMode(display=False)
    with counter:  # the loss by hand: one LM-head product, whatever else the model computes alongside its loss
        logits = model(ids).logits
        F.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    params = sum(p.numel() for p in model.parameters())
    c = model.config
    predicted = seq * gpu_check.model_flops_per_token(params, c.num_hidden_layers, c.hidden_size, seq)
    assert counter.get_total_flops() == pytest.approx(predicted, rel=0.02)  # norm weights: the only gap
    # the attention term matters at this size: without it the formula would be far off
    assert counter.get_total_flops() > 1.2 * seq * 6 * params


def test_peak_flops_by_gpu_name_and_mfu_rows():
    gpu_check = gpu_check_module()
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.4
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("Intel(R) Xeon(R)") is None
    record = {"mode": "time", "ok": True, "params": 10**8, "step_s": 0.5, "tokens_per_s": 8192 / 0.5,
              "spec": {"model": "revformer", "num_layers": 12, "hidden_size": 1024, "seq_len": 8192}}
    (row,) = gpu_check.mfu_rows([record, {"mode": "memory", "ok": True}], peak=1000.0)
    flops = 6 * 10**8 + 12 * 12 * 1024 * 8192
    assert row["achieved_tflops"] == pytest.approx(flops * 16384 / 1e12)
    assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 1000.0)


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    """`python -m benchmarks gpu_check --dry-run`: every stage of the GPU check on the CPU at tiny sizes, as CI rehearsal."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu_check", "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env"]["device"] == "cpu" and summary["env"]["dry_run"]
    assert {name: s["status"] for name, s in summary["stages"].items()} == dict.fromkeys(
        ("env", "tests", "core", "length", "depth", "longseq", "memory"), "ok")
    tests = summary["stages"]["tests"]
    assert tests["passed"] >= 2 and tests["failures"] == tests["errors"] == 0
    assert {r["test"].split("::")[-1].split("[")[0] for r in summary["tests_report"]} == {
        "test_generation_with_a_cache", "test_model_trains_long_sequences_without_the_math_fallback"}
    assert {r["model"] for r in summary["mfu"]} == {"revformer", "revformer_plain", "llama", "llama_ckpt"}
    assert all(r["achieved_tflops"] > 0 and r["mfu"] is None for r in summary["mfu"])  # no peak known for a CPU
    status = {t["target"].split(" (")[0].split(" >=")[0].split(" <=")[0]: t["status"] for t in summary["targets"]}
    assert status["MFU"] == "not measured"
    assert all(s in ("met", "missed") for name, s in status.items() if name != "MFU"), status
    probes = summary["length_probes"]
    assert {p["name"] for p in probes} == {"recipe", "full"} and all(p["ok"] and p["fits"] for p in probes)
    for suite, workers in (("core", 1), ("depth", 2), ("memory", 1)):  # every suite ran its workers, none failed
        records = [json.loads(line) for line in (tmp_path / "bench" / f"{suite}.jsonl").read_text().splitlines()]
        assert records[-1]["mode"] == "suite" and all(r.get("ok") for r in records), records
        measured = [r for r in records if r["mode"] not in ("suite", "memory_summary")]  # memory: + its summary
        assert len(measured) == workers * (4 if suite == "core" else 1)  # core: one record per timed model
    assert (tmp_path / "bench" / "longseq.jsonl").exists()
    assert "# GPU check: CPU" in (tmp_path / "SUMMARY.md").read_text()
    assert (tmp_path / "bench" / "README.md").exists() and (tmp_path / "gpu_check.log").stat().st_size > 0


def test_multi_node_fsdp_launch_config_is_what_accelerate_reads():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp_multinode.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.fsdp_config["fsdp_version"] == 2
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 16, 0)  # 2 machines x 8 GPUs
    assert config.main_process_ip and config.main_process_port and config.rdzv_backend == "static"
    # the shard units are the modules the reversible engine calls, as in fsdp.yaml
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "RevformerAttention,RevformerFeedForward"
