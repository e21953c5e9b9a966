"""Tests for revformer.attention: every kernel against naive dense references (values and gradients).

`eager` and `full` are the dense path that `full` layers run (`dense_allowed` + `dense_attention`), through revformer's
eager attention and through transformers' sdpa; `local` and `lsh` are the linear-memory kernels.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from conftest import KERNELS as KERNEL_FUNCTIONS
from revformer.attention import LSH_SELF_MASK_VALUE

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
    fn = KERNEL_FUNCTIONS[name]
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
    """Chunks counted in real tokens: rank = index among the row's real tokens (the index itself unpadded)."""
    real = torch.ones(1, t_k, dtype=torch.bool) if mask is None else mask
    rank = real.long().cumsum(-1) - 1  # (B | 1, Tk)
    q_rank, k_rank = rank[:, t_k - t_q :, None], rank[:, None, :]
    window = (k_rank <= q_rank) & (k_rank // chunk >= q_rank // chunk - before)
    return (window & real[:, None, :] & real[:, t_k - t_q :, None])[:, None]


@pytest.mark.parametrize("t_k", [13, 16, 3])
@pytest.mark.parametrize("before", [0, 1, 2])
@pytest.mark.parametrize("n_queries", [None, 1, 6])  # None: training (Tq == Tk); else cached, Tq < Tk
def test_local_matches_windowed_reference(t_k: int, before: int, n_queries: int | None) -> None:
    t_q = t_k if n_queries is None else min(n_queries, t_k - 1)
    q, k, v = qkv(t_k, seed=t_k + before)
    q_last = q[:, :, t_k - t_q :]
    for mask in (None, left_padding(t_k, (0, 2)), left_padding(t_k, (1, 0)) & (torch.arange(t_k) != t_k // 2)):
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


def rotations(n_hashes: int, n_buckets: int, seed: int = 0) -> Tensor:
    return torch.randn(D, n_hashes, n_buckets // 2, generator=torch.Generator().manual_seed(seed))


def attend_lsh(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, rot: Tensor | None, p: float = 0.0,
               **cfg: int) -> Tensor:
    return KERNEL_FUNCTIONS["lsh"](q, k, v, key_padding_mask=mask, dropout_p=p, scale=SCALE,
                                      config=make_config(**cfg), rotations=rot)


def naive_lsh_allowed(k: Tensor, mask: Tensor | None, rot: Tensor | None, n_buckets: int, window: int,
                      t_q: int) -> Tensor:
    """(B, H, Tq, Tk) keys each query sees, written from the rule with loops: in each hash round, the query's
    `window` most recent earlier real tokens of its bucket, plus itself; the union over the rounds."""
    b, h, t, _ = k.shape
    if rot is None:
        buckets = torch.zeros(b, h, 1, t, dtype=torch.long)
    else:
        rotated = torch.einsum("bhtd,drk->bhrtk", unit(k).detach().float(), rot)
        buckets = torch.cat([rotated, -rotated], -1).argmax(-1)  # (B, H, R, T)
    real = torch.ones(b, t, dtype=torch.bool) if mask is None else mask
    allowed = torch.zeros(b, h, t_q, t, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qi in range(t_q):
                i = t - t_q + qi
                if not real[bi, i]:
                    continue
                allowed[bi, hi, qi, i] = True
                for bk in buckets[bi, hi]:
                    same = [j for j in range(i) if real[bi, j] and bk[j] == bk[i]]
                    for j in same[max(0, len(same) - window) :]:
                        allowed[bi, hi, qi, j] = True
    return allowed


LSH_CASES = [  # (t, buckets, hashes, window): lengths not multiples of the window; one bucket = a sliding window
    (13, 4, 3, 3), (16, 4, 2, 4), (11, 8, 2, 2), (9, 2, 1, 5), (14, 1, 1, 4), (7, 4, 2, 16),
]


@pytest.mark.parametrize("t,n_buckets,n_hashes,window", LSH_CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_lsh_matches_dense_reference(t: int, n_buckets: int, n_hashes: int, window: int, padded: bool) -> None:
    q, _, v = qkv(t, seed=t + n_buckets, shared_qk=True)
    mask = left_padding(t, (0, 3)) if padded else None
    rot = rotations(n_hashes, n_buckets) if n_buckets > 1 else None
    cfg = dict(lsh_num_buckets=n_buckets, lsh_num_hashes=n_hashes, lsh_chunk_length=window)
    allowed = naive_lsh_allowed(q, mask, rot, n_buckets, window, t)
    ref, _ = reference(q, unit(q), v, allowed, self_value=LSH_SELF_MASK_VALUE)
    out = attend_lsh(q, q, v, mask, rot, **cfg)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert_same_grads(out, ref, (q, v))
    if t > window + 1 and (n_buckets > 1 or t > window + 2):  # the windows are genuinely restricted
        assert (causal_allowed(t, t, mask) & ~allowed).any()
        exact, _ = reference(q, unit(q), v, causal_allowed(t, t, mask), self_value=LSH_SELF_MASK_VALUE)
        assert not torch.allclose(out, exact)


@pytest.mark.parametrize("t,n_buckets,n_hashes,window", LSH_CASES[:4])
@pytest.mark.parametrize("t_q", [1, 3])
def test_lsh_cached_rows_match_dense_reference_and_full_rows(t: int, n_buckets: int, n_hashes: int, window: int,
                                                          t_q: int) -> None:
    q, _, v = qkv(t, seed=t, shared_qk=True)
    mask = left_padding(t, (0, 2))
    rot = rotations(n_hashes, n_buckets, seed=1)
    cfg = dict(lsh_num_buckets=n_buckets, lsh_num_hashes=n_hashes, lsh_chunk_length=window)
    state = torch.get_rng_state()
    cached = attend_lsh(q[:, :, -t_q:], q, v, mask, rot, **cfg)
    assert torch.equal(state, torch.get_rng_state())  # fixed rotations: nothing drawn
    full_seq = attend_lsh(q, q, v, mask, rot, **cfg)
    torch.testing.assert_close(cached, full_seq[:, :, -t_q:], atol=1e-12, rtol=1e-10)
    ref, _ = reference(q[:, :, -t_q:], unit(q), v, naive_lsh_allowed(q, mask, rot, n_buckets, window, t_q),
                       self_value=LSH_SELF_MASK_VALUE)
    torch.testing.assert_close(cached, ref, atol=1e-12, rtol=1e-10)
    assert_same_grads(cached, ref, (q, v))


def test_lsh_grouped_blocks_equal_one_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks run in checkpointed groups under autograd: values and gradients as with a single group."""
    import revformer.attention as attention

    q, _, v = qkv(29, shared_qk=True)
    rot = rotations(2, 4)
    cfg = dict(lsh_num_buckets=4, lsh_num_hashes=2, lsh_chunk_length=3)
    one = attend_lsh(q, q, v, None, rot, **cfg)
    monkeypatch.setattr(attention, "LSH_GROUP_SCORES", 1)  # one block per group
    grouped = attend_lsh(q, q, v, None, rot, **cfg)
    torch.testing.assert_close(grouped, one, atol=1e-12, rtol=1e-10)
    assert_same_grads(grouped, one, (q, v))


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
    fixed = [attend_lsh(q, q, v, None, rotations(2, 8, seed=s), **cfg) for s in (3, 3)]
    assert torch.equal(fixed[0], fixed[1])


def test_lsh_rejects_rotations_of_the_wrong_shape() -> None:
    q, _, v = qkv(6, shared_qk=True)
    with pytest.raises(ValueError, match="lsh_rotations"):
        attend_lsh(q, q, v, None, rotations(2, 8), lsh_num_buckets=4, lsh_num_hashes=2)


# -------------------------------------------------------------------------------------------- all kernels


def leak_configs(name: str) -> list[dict[str, int]]:
    if name == "lsh":  # several buckets: a later token's bucket must not move what earlier queries see
        return [dict(lsh_num_buckets=4, lsh_num_hashes=2, lsh_chunk_length=3),
                dict(lsh_num_buckets=8, lsh_num_hashes=3, lsh_chunk_length=2),
                dict(lsh_num_buckets=1, lsh_chunk_length=16)]
    return [
        dict(local_chunk_length=3, local_num_chunks_before=1),
        dict(local_chunk_length=4, local_num_chunks_before=0),
    ]


@pytest.mark.parametrize("name", KERNELS)
def test_no_future_leak_by_perturbation(name: str) -> None:
    t = 14
    q, k, v = (x.detach() for x in qkv(t, shared_qk=name == "lsh"))
    for cfg in leak_configs(name):
        torch.manual_seed(0)  # the same fresh LSH rotations for every call
        base = attend(name, q, k, v, **cfg)
        for pos in (0, 5, 9, t - 1):
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            noise = 3 * torch.randn(B, H, D, dtype=q.dtype)
            q2[:, :, pos] += noise
            k2[:, :, pos] += noise if name == "lsh" else -noise  # keep shared QK shared
            v2[:, :, pos] += 3.0
            torch.manual_seed(0)
            out = attend(name, q2, k2, v2, **cfg)
            torch.testing.assert_close(out[:, :, :pos], base[:, :, :pos], atol=1e-12, rtol=0)
            assert not torch.allclose(out[:, :, pos:], base[:, :, pos:])


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("n_queries", [None, 2])  # None: training (Tq == Tk); else cached, Tq < Tk
def test_left_padding_gives_the_unpadded_rows(name: str, n_queries: int | None) -> None:
    """A row with p leading pads equals the same tokens unpadded, for every kernel (lsh with fixed rotations)."""
    t, pads = 11, 4
    q, k, v = (x.detach() for x in qkv(t, seed=5, shared_qk=name == "lsh"))
    k = q if name == "lsh" else k
    mask = left_padding(t + pads, (pads, pads))
    filler = torch.randn(B, H, pads, D, dtype=q.dtype)
    padded = [torch.cat([filler, x], dim=2) for x in (q, k, v)]
    t_q = t + pads if n_queries is None else n_queries
    cfg = dict(local_chunk_length=3, local_num_chunks_before=1, lsh_num_buckets=4, lsh_num_hashes=2, lsh_chunk_length=3)
    kwargs = dict(key_padding_mask=mask, dropout_p=0.0, scale=SCALE, config=make_config(**cfg))
    extra = dict(rotations=rotations(2, 4)) if name == "lsh" else {}
    fn = KERNEL_FUNCTIONS[name]
    out = fn(padded[0][:, :, -t_q:], padded[1], padded[2], **kwargs, **extra)
    alone = fn(q[:, :, -min(t_q, t) :], k, v, **{**kwargs, "key_padding_mask": None}, **extra)
    torch.testing.assert_close(out[:, :, -t:], alone, atol=1e-12, rtol=1e-10)
    if n_queries is None:
        assert out[:, :, :pads].abs().max() == 0  # pad queries give 0


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


# ------------------------------------------------------------------------------------- in the model (tiny configs)

MODEL_KINDS = {
    "full": dict(attention_layers="full"),
    "local": dict(attention_layers="local", local_chunk_length=4, local_num_chunks_before=1),
    "lsh": dict(attention_layers="lsh", lsh_num_buckets=4, lsh_num_hashes=2, lsh_chunk_length=4),
    "lsh_8x3": dict(attention_layers="lsh", lsh_num_buckets=8, lsh_num_hashes=3, lsh_chunk_length=3),
    "mixed": dict(attention_layers=["local", "lsh", "full", "lsh"], num_hidden_layers=4, local_chunk_length=3,
                  lsh_num_buckets=4, lsh_num_hashes=2, lsh_chunk_length=5),
}


def make_model(kind: str, sharpen: float = 6.0, **overrides: object):
    """A tiny model whose attention projections are scaled up, so attention is far from uniform and any leak or
    change of the attended set shows in the logits."""
    from conftest import tiny_config
    from revformer import RevformerForCausalLM

    torch.manual_seed(0)
    model = RevformerForCausalLM(tiny_config(**{**MODEL_KINDS[kind], **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("q_proj", "k_proj", "v_proj")):
                p.mul_(sharpen)
    return model


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_perturbing_a_token_leaves_earlier_logits_unchanged(kind: str, mode: str) -> None:
    model = make_model(kind, hidden_dropout=0.1, attention_dropout=0.1)
    model.train(mode == "train")
    ids = torch.randint(3, 128, (2, 37))  # not a multiple of any window
    with torch.no_grad():
        torch.manual_seed(1)  # train mode: the same rotations and dropout masks for every forward
        base = model(ids).logits
        for j in (6, 21, 36):
            changed = ids.clone()
            changed[:, j] = (ids[:, j] + 17) % 125 + 3
            torch.manual_seed(1)
            out = model(changed).logits
            torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-5, rtol=0)
            assert (out[:, j:] - base[:, j:]).abs().max() > 1e-3  # the change does reach later positions


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_model_eval_is_deterministic_and_survives_save_load(kind: str, tmp_path) -> None:
    from revformer import RevformerForCausalLM

    model = make_model(kind).eval()
    ids = torch.randint(3, 128, (2, 30))
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(ids).logits
        torch.manual_seed(2)  # eval mode must not depend on the global RNG
        second = model(ids).logits
        model.save_pretrained(tmp_path)
        loaded = RevformerForCausalLM.from_pretrained(tmp_path).eval()
        reloaded = loaded(ids).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(reloaded, first, atol=1e-6, rtol=0)
    if kind.startswith("lsh"):  # training draws fresh rotations: two training forwards differ
        with torch.no_grad():
            model.train()
            assert not torch.allclose(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_model_cached_decoding_equals_full_forward(kind: str) -> None:
    model = make_model(kind).eval()
    ids = torch.randint(3, 128, (2, 23))
    with torch.no_grad():
        full = model(ids).logits
        for pieces in ([1] * 23, [9, 1, 5, 8]):  # token by token; a prompt, then several tokens per step
            cache, logits, start = None, [], 0
            for n in pieces:
                out = model(ids[:, start : start + n], cache=cache, use_cache=True)
                cache, start = out.cache, start + n
                logits.append(out.logits)
            torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-4, rtol=0)


def left_padded(prompts: list[Tensor]) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_model_left_padded_batch_equals_rows_alone(kind: str) -> None:
    model = make_model(kind).eval()
    prompts = [torch.randint(3, 128, (n,)) for n in (13, 21, 6)]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            alone = model(p[None]).logits
            torch.testing.assert_close(batched[i, -len(p) :], alone[0], atol=1e-4, rtol=0)
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        generated = model.generate(ids, attention_mask=mask, **kwargs)
        for i, p in enumerate(prompts):
            single = model.generate(p[None], **kwargs)
            assert torch.equal(generated[i, -8:], single[0, -8:]), (kind, i)


@pytest.mark.parametrize("kind", ["lsh", "lsh_8x3", "mixed"])
def test_model_reversible_gradients_equal_plain_with_dropout(kind: str) -> None:
    from conftest import relative_error

    model = make_model(kind, sharpen=1.0, hidden_dropout=0.1, attention_dropout=0.1).train()
    ids = torch.randint(3, 128, (2, 29))
    grads = {}
    for reversible in (True, False):
        model.config.reversible = reversible
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same rotations and dropout masks on both paths
        model(ids, labels=ids).loss.backward()
        grads[reversible] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, plain in grads[False].items():
        assert relative_error(grads[True][name], plain) < 1e-5, (kind, name)
