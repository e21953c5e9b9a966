"""Tests for revformer.attention: every kernel against naive dense references (values and gradients)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from revformer.attention import ATTENTION_FUNCTIONS, LSH_SELF_MASK_VALUE

B, H, D = 2, 3, 8
SCALE = D**-0.5
KERNELS = ("eager", "full", "local", "lsh")


def make_config(**overrides: int) -> SimpleNamespace:
    base = dict(
        local_chunk_length=4, local_num_chunks_before=1, lsh_num_buckets=4, lsh_num_hashes=2, lsh_chunk_length=4
    )
    return SimpleNamespace(**{**base, **overrides})


def attend(
    name: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, p: float = 0.0, **cfg: int
) -> Tensor:
    fn = ATTENTION_FUNCTIONS[name]
    return fn(q, k, v, key_padding_mask=mask, dropout_p=p, scale=SCALE, config=make_config(**cfg))


def qkv(t: int, seed: int = 0, dtype: torch.dtype = torch.float64, shared_qk: bool = False) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, t, D, generator=g, dtype=dtype) for _ in range(3))
    if shared_qk:
        k = q.detach().clone()
    return tuple(x.requires_grad_() for x in (q, k, v))


def left_padding(t: int, pads: tuple[int, ...] = (0, 3)) -> Tensor:
    """(B, T) bool, True = real; row b has pads[b] leading pad tokens."""
    return torch.arange(t)[None, :] >= torch.tensor(pads)[:, None]


def causal_allowed(t_q: int, t_k: int, mask: Tensor | None) -> Tensor:
    """(B | 1, 1, Tq, Tk) allowed pairs: causal by key index, queries at the end, padding keys removed."""
    q_pos = torch.arange(t_k - t_q, t_k)[:, None]
    allowed = (torch.arange(t_k)[None, :] <= q_pos)[None, None]
    return allowed if mask is None else allowed & mask[:, None, None, :]


def reference(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, self_value: float | None = None
) -> tuple[Tensor, Tensor]:
    """Dense masked softmax attention. Returns output and per-row logsumexp; empty rows give 0."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = SCALE * q @ k.transpose(-1, -2)
    if self_value is not None:
        is_self = torch.arange(t_k)[None, :] == torch.arange(t_k - t_q, t_k)[:, None]
        scores = torch.where(is_self, torch.full_like(scores, self_value), scores)
    scores = scores.masked_fill(~allowed, -1e30)
    lse = scores.logsumexp(-1, keepdim=True)
    probs = torch.exp(scores - lse) * allowed.any(-1, keepdim=True)
    return probs @ v, lse


def unit(k: Tensor) -> Tensor:
    return k / k.norm(dim=-1, keepdim=True)


def assert_same_grads(out: Tensor, ref: Tensor, inputs: tuple[Tensor, ...], atol: float = 1e-10) -> None:
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, upstream, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, upstream, retain_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-8)


# ----------------------------------------------------------------------------------------------- eager / full


@pytest.mark.parametrize("t_q,t_k", [(11, 11), (3, 11), (1, 11)])
@pytest.mark.parametrize("padded", [False, True])
def test_eager_and_full_match_reference(t_q: int, t_k: int, padded: bool) -> None:
    q, k, v = qkv(t_k)
    q_last = q[:, :, t_k - t_q :]
    mask = left_padding(t_k, (0, 4)) if padded else None
    ref, _ = reference(q_last, k, v, causal_allowed(t_q, t_k, mask))
    for name in ("eager", "full"):
        out = attend(name, q_last, k, v, mask)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        assert_same_grads(out, ref, (q, k, v))


def test_fully_masked_rows_are_zero_with_finite_grads() -> None:
    q, k, v = qkv(9, dtype=torch.float32)
    mask = left_padding(9, (0, 5))
    for name in KERNELS:
        out = attend(name, q, k, v, mask, lsh_num_hashes=1)
        assert torch.isfinite(out).all(), name
        assert out[1, :, :5].abs().max() == 0, name  # pad queries see only pad keys
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads), name


# ----------------------------------------------------------------------------------------------------- local


def local_allowed(t_q: int, t_k: int, chunk: int, before: int, mask: Tensor | None) -> Tensor:
    q_pos = torch.arange(t_k - t_q, t_k)[:, None]
    k_pos = torch.arange(t_k)[None, :]
    window = (k_pos <= q_pos) & (k_pos // chunk >= q_pos // chunk - before)
    allowed = window[None, None]
    return allowed if mask is None else allowed & mask[:, None, None, :]


@pytest.mark.parametrize("t_k", [13, 16, 3])
@pytest.mark.parametrize("before", [0, 1, 2])
@pytest.mark.parametrize("n_queries", [None, 1, 6])  # None: training (Tq == Tk); else cached, Tq < Tk
def test_local_matches_windowed_reference(t_k: int, before: int, n_queries: int | None) -> None:
    t_q = t_k if n_queries is None else min(n_queries, t_k - 1)
    q, k, v = qkv(t_k, seed=t_k + before)
    q_last = q[:, :, t_k - t_q :]
    for mask in (None, left_padding(t_k, (0, 2))):
        ref, _ = reference(q_last, k, v, local_allowed(t_q, t_k, 4, before, mask))
        out = attend("local", q_last, k, v, mask, local_chunk_length=4, local_num_chunks_before=before)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        assert_same_grads(out, ref, (q, k, v))


@pytest.mark.parametrize("t_q", [1, 2, 5])
def test_local_cached_rows_equal_full_sequence_rows(t_q: int) -> None:
    q, k, v = qkv(21)
    cfg = dict(local_chunk_length=5, local_num_chunks_before=1)
    full_seq = attend("local", q, k, v, **cfg)
    cached = attend("local", q[:, :, -t_q:], k, v, **cfg)
    torch.testing.assert_close(cached, full_seq[:, :, -t_q:], atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------------------------------------------- lsh


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_lsh_single_bucket_whole_chunk_is_exact_self_masked_attention(n_hashes: int, padded: bool) -> None:
    t = 11
    q, _, v = qkv(t, shared_qk=True)
    mask = left_padding(t, (0, 3)) if padded else None
    out = attend("lsh", q, q, v, mask, lsh_num_buckets=1, lsh_num_hashes=n_hashes, lsh_chunk_length=t)
    ref, _ = reference(q, unit(q), v, causal_allowed(t, t, mask), self_value=LSH_SELF_MASK_VALUE)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert_same_grads(out, ref, (q, v))


def test_lsh_single_bucket_small_chunks_is_local_window() -> None:
    t, chunk = 13, 4
    q, _, v = qkv(t, shared_qk=True)
    out = attend("lsh", q, q, v, lsh_num_buckets=1, lsh_num_hashes=1, lsh_chunk_length=chunk)
    ref, _ = reference(q, unit(q), v, local_allowed(t, t, chunk, 1, None), self_value=LSH_SELF_MASK_VALUE)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


def naive_lsh(
    q: Tensor, v: Tensor, mask: Tensor | None, seed: int, n_hashes: int, n_buckets: int, chunk: int
) -> tuple[Tensor, Tensor]:
    """Dense per-round LSH: same rotations (same seed), allowed pairs from the sorted chunks."""
    t = q.shape[-2]
    k = unit(q)
    torch.manual_seed(seed)
    rotations = torch.randn(D, n_hashes, n_buckets // 2)
    rotated = torch.einsum("bhtd,drk->bhrtk", k.detach().float(), rotations)
    buckets = torch.cat([rotated, -rotated], -1).argmax(-1)  # (B, H, R, T)
    outs, lses = [], []
    for r in range(n_hashes):
        # Rank of each position in the (bucket, position) order -> its chunk.
        order = [sorted(range(t), key=lambda i: (int(bk[i]), i)) for bk in buckets[:, :, r].reshape(-1, t)]
        chunk_of = torch.empty(B * H, t, dtype=torch.long)
        for row, o in enumerate(order):
            for rank, i in enumerate(o):
                chunk_of[row, i] = rank // chunk
        chunk_of = chunk_of.view(B, H, t)
        gap = chunk_of[..., :, None] - chunk_of[..., None, :]  # query chunk - key chunk
        same_or_prev = (gap == 0) | (gap == 1)
        allowed = same_or_prev & causal_allowed(t, t, mask)
        out, lse = reference(q, k, v, allowed, self_value=LSH_SELF_MASK_VALUE)
        outs.append(out)
        lses.append(lse)
    weights = torch.stack(lses).softmax(0)
    return (weights * torch.stack(outs)).sum(0), buckets


@pytest.mark.parametrize("t,chunk", [(13, 3), (16, 4), (5, 2)])
@pytest.mark.parametrize("padded", [False, True])
def test_lsh_matches_naive_hashing(t: int, chunk: int, padded: bool) -> None:
    q, _, v = qkv(t, seed=t, shared_qk=True)
    mask = left_padding(t, (0, 2)) if padded else None
    cfg = dict(lsh_num_buckets=4, lsh_num_hashes=3, lsh_chunk_length=chunk)
    torch.manual_seed(123)
    out = attend("lsh", q, q, v, mask, **cfg)
    ref, buckets = naive_lsh(q, v, mask, 123, 3, 4, chunk)
    assert buckets.unique().numel() > 1  # the hashing is really exercised
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert_same_grads(out, ref, (q, v))
    if t > 2 * chunk:  # windows are genuinely restricted: differs from exact attention
        exact, _ = reference(q, unit(q), v, causal_allowed(t, t, mask), self_value=LSH_SELF_MASK_VALUE)
        assert not torch.allclose(out, exact)


@pytest.mark.parametrize("t_q", [1, 4])
def test_lsh_cached_fallback_is_exact_self_masked_attention(t_q: int) -> None:
    t = 12
    q, _, v = qkv(t, shared_qk=True)
    mask = left_padding(t, (0, 3))
    state = torch.get_rng_state()
    out = attend("lsh", q[:, :, -t_q:], q, v, mask)
    assert torch.equal(state, torch.get_rng_state())  # no rotations drawn
    ref, _ = reference(q[:, :, -t_q:], unit(q), v, causal_allowed(t_q, t, mask), self_value=LSH_SELF_MASK_VALUE)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert_same_grads(out, ref, (q, v))


def test_lsh_self_attends_only_when_alone() -> None:
    q, _, v = qkv(6, shared_qk=True)
    out = attend("lsh", q, q, v, lsh_num_buckets=1, lsh_chunk_length=6)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])  # first token: only itself
    # Second token: its own key (max score under shared QK) is suppressed, so it copies token 0.
    torch.testing.assert_close(out[:, :, 1], v[:, :, 0])


def test_lsh_determinism() -> None:
    q, _, v = qkv(16, shared_qk=True)
    cfg = dict(lsh_num_buckets=8, lsh_num_hashes=2, lsh_chunk_length=2)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(attend("lsh", q, q, v, **cfg))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


# -------------------------------------------------------------------------------------------- all kernels


def leak_configs(name: str) -> list[dict[str, int]]:
    if name == "lsh":  # one bucket: hashing cannot move earlier tokens' chunks
        return [dict(lsh_num_buckets=1, lsh_chunk_length=3), dict(lsh_num_buckets=1, lsh_chunk_length=16)]
    return [
        dict(local_chunk_length=3, local_num_chunks_before=1),
        dict(local_chunk_length=4, local_num_chunks_before=0),
    ]


@pytest.mark.parametrize("name", KERNELS)
def test_no_future_leak_by_perturbation(name: str) -> None:
    t = 14
    q, k, v = (x.detach() for x in qkv(t, shared_qk=name == "lsh"))
    for cfg in leak_configs(name):
        base = attend(name, q, k, v, **cfg)
        for pos in (0, 5, t - 1):
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            noise = torch.randn(B, H, D, dtype=q.dtype)
            q2[:, :, pos] += noise
            k2[:, :, pos] += noise if name == "lsh" else -noise  # keep shared QK shared
            v2[:, :, pos] += 3.0
            out = attend(name, q2, k2, v2, **cfg)
            torch.testing.assert_close(out[:, :, :pos], base[:, :, :pos], atol=0, rtol=0)
            assert not torch.allclose(out[:, :, pos:], base[:, :, pos:])


@pytest.mark.parametrize("name", KERNELS)
def test_no_future_leak_by_gradient(name: str) -> None:
    """d out[:t] / d (q, k, v)[t:] == 0, including multi-bucket LSH (hashing is not differentiable)."""
    n = 15
    q, k, v = qkv(n, shared_qk=name == "lsh")
    torch.manual_seed(0)
    out = attend(name, q, q if name == "lsh" else k, v, lsh_num_buckets=4, lsh_chunk_length=3)
    for pos in (1, 7, 12):
        grads = torch.autograd.grad(out[:, :, :pos].sum(), (q, k, v), retain_graph=True, allow_unused=True)
        for g in grads:
            if g is not None:
                assert g[:, :, pos:].abs().max() == 0


@pytest.mark.parametrize("name", KERNELS)
def test_dropout_is_replayed_from_rng_state(name: str) -> None:
    q, k, v = qkv(10, shared_qk=name == "lsh")
    k = q if name == "lsh" else k
    no_drop = attend(name, q, k, v)
    state = torch.get_rng_state()
    first = attend(name, q, k, v, p=0.5)
    after = torch.get_rng_state()
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        replay = attend(name, q, k, v, p=0.5)
    assert torch.equal(torch.get_rng_state(), after)  # fork_rng restored the outer state
    assert torch.equal(first, replay)
    assert not torch.allclose(first, no_drop)
    first.square().sum().backward()  # the dropout path is differentiable
    assert all(torch.isfinite(x.grad).all() for x in (q, v))


@pytest.mark.parametrize("name", KERNELS)
def test_zero_dropout_rng_consumption(name: str) -> None:
    """p=0: eager/full/local draw nothing; lsh draws exactly its rotations."""
    q, k, v = (x.detach() for x in qkv(10))
    k = q if name == "lsh" else k
    torch.manual_seed(3)
    attend(name, q, k, v, lsh_num_buckets=4, lsh_num_hashes=2)
    after_call = torch.get_rng_state()
    torch.manual_seed(3)
    if name == "lsh":
        torch.randn(D, 2, 2)
    assert torch.equal(after_call, torch.get_rng_state())


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(name: str, dtype: torch.dtype) -> None:
    q, k, v = (x.detach() for x in qkv(13, dtype=torch.float32))
    k = q if name == "lsh" else k
    mask = left_padding(13, (0, 2))
    half = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    # One bucket for the comparison: a rounding-induced hash flip would change LSH windows.
    ref = attend(name, q, k, v, mask, lsh_num_buckets=1)
    out = attend(name, *half, mask, lsh_num_buckets=1)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    hashed = attend(name, *half, mask, lsh_num_buckets=4)
    (out.float().square().sum() + hashed.float().square().sum()).backward()
    assert torch.isfinite(hashed).all()
    assert all(torch.isfinite(x.grad).all() for x in half if x.grad is not None)


def test_bad_bucket_count_rejected() -> None:
    q, k, v = qkv(6)
    with pytest.raises(ValueError):
        attend("lsh", q, q, v, lsh_num_buckets=3)


def test_long_sequence_memory_linear_kernels_run() -> None:
    """Local and LSH only build per-chunk tensors; a 4k sequence must be cheap on CPU."""
    t = 4096
    q, k, v = (torch.randn(1, 1, t, D) for _ in range(3))
    for name in ("local", "lsh"):
        out = attend(name, q, q if name == "lsh" else k, v, local_chunk_length=64, lsh_chunk_length=64)
        assert out.shape == (1, 1, t, D) and torch.isfinite(out).all()
