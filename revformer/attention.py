"""Attention kernels for revformer (depends on torch only; shipped beside the Hub model code).

Every kernel has the same signature and is picked by name from ``ATTENTION_FUNCTIONS``::

    kernel(q, k, v, *, key_padding_mask, dropout_p, scale, config) -> Tensor

- ``q``: (B, H, Tq, D); ``k``, ``v``: (B, H, Tk, D) with Tk >= Tq. The queries are the *last* Tq
  positions of the key sequence: query i sits at key index Tk - Tq + i (Tq == Tk in training,
  Tq < Tk in cached generation).
- ``key_padding_mask``: (B, Tk) bool, True = real token, or None.
- Attention is causal by key index. A query row with no admissible key (e.g. a left-padding
  position) returns zeros, never NaN. The result is (B, H, Tq, D) in q's dtype.
- ``config``: any object with ``local_chunk_length``, ``local_num_chunks_before``,
  ``lsh_num_buckets``, ``lsh_num_hashes`` and ``lsh_chunk_length``.

Randomness (dropout, LSH rotations) is drawn from the default generator of q's device, so
restoring the RNG state replays a call bit for bit (the reversible engine relies on this). With
``dropout_p == 0`` the ``eager``, ``full`` and ``local`` kernels draw nothing; ``lsh`` draws only
its rotations (none when ``lsh_num_buckets == 1`` or in the cached fallback).

Non-SDPA kernels run the matmuls in the input dtype and the masking/softmax in at least fp32.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTENTION_FUNCTIONS",
    "AttentionFunction",
    "LSH_SELF_MASK_VALUE",
    "eager_attention",
    "full_attention",
    "local_attention",
    "lsh_attention",
    "lsh_buckets",
]

AttentionFunction = Callable[..., Tensor]

# Score given to a query's own key in LSH attention (shared-QK makes q.k_self the largest score,
# so it is penalised). Finite and far above the mask value: it wins only when nothing else is allowed.
LSH_SELF_MASK_VALUE = -1e5


def _upcast(x: Tensor) -> Tensor:
    """Promote half types to fp32 for softmax; keep fp32/fp64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _mask_value(x: Tensor) -> float:
    return torch.finfo(x.dtype).min


def _positional_mask(t_q: int, t_k: int, key_padding_mask: Tensor | None, device: torch.device) -> Tensor:
    """Causal (+ padding) mask aligned to the end of the key sequence: (B | 1, 1, Tq, Tk) bool."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)
    k_pos = torch.arange(t_k, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    return allowed


def _dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    scale: float,
    self_mask_value: float | None,
) -> Tensor:
    """Explicit-score causal attention; optionally penalise each query's own key (LSH rule)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    allowed = _positional_mask(t_q, t_k, key_padding_mask, q.device)  # (B | 1, 1, Tq, Tk)
    scores = _upcast((q * scale) @ k.transpose(-1, -2))  # (B, H, Tq, Tk); q pre-scaled against fp16 overflow
    if self_mask_value is not None:
        is_self = torch.arange(t_k, device=q.device) == torch.arange(t_k - t_q, t_k, device=q.device)[:, None]
        scores = scores.masked_fill(is_self, self_mask_value)
    scores = scores.masked_fill(~allowed, _mask_value(scores))
    # Finite mask value + zeroing keeps fully masked rows at 0 (no NaN in values or gradients).
    probs = scores.softmax(-1) * allowed.any(-1, keepdim=True)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return (probs.to(v.dtype) @ v).to(q.dtype)


def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, dropout_p: float, scale: float, config: Any
) -> Tensor:
    """Naive reference: explicit (Tq, Tk) scores, causal + padding mask, softmax, dropout."""
    return _dense_attention(q, k, v, key_padding_mask, dropout_p, scale, self_mask_value=None)


def full_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, dropout_p: float, scale: float, config: Any
) -> Tensor:
    """Exact causal attention through ``F.scaled_dot_product_attention`` (flash/mem-efficient on GPU)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    if key_padding_mask is None and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    # is_causal aligns the diagonal top-left, so with a cache (Tq < Tk) or padding pass an explicit mask.
    allowed = _positional_mask(t_q, t_k, key_padding_mask, q.device)  # (B | 1, 1, Tq, Tk)
    row_ok = allowed.any(-1, keepdim=True)  # (B | 1, 1, Tq, 1)
    # Fully masked rows would give NaN in some backends: let them see every key, then zero them.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~row_ok, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(~row_ok, 0.0)


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, dropout_p: float, scale: float, config: Any
) -> Tensor:
    """Causal chunked attention with memory linear in length.

    Key positions are cut into chunks of ``config.local_chunk_length`` (C) from index 0; the query at
    key index p attends to keys j <= p with j // C >= p // C - ``config.local_num_chunks_before`` (N).
    The window depends only on absolute indices, so a cached call (Tq < Tk) gives exactly the rows the
    full-sequence call gives, and only the chunks holding the queries are computed.
    """
    chunk, before = int(config.local_chunk_length), int(config.local_num_chunks_before)
    if chunk < 1 or before < 0:
        raise ValueError(f"bad local attention config: chunk={chunk}, chunks_before={before}")
    t_q, t_k = q.shape[-2], k.shape[-2]
    offset = t_k - t_q  # key index of the first query
    first_chunk, lead = divmod(offset, chunk)
    n_chunks = -(-(lead + t_q) // chunk)
    window = (before + 1) * chunk
    device = q.device

    # Absolute positions of the (chunk-aligned, padded) query slots and of the key slots they may see.
    q_pos = torch.arange(first_chunk * chunk, (first_chunk + n_chunks) * chunk, device=device)  # (n*C,)
    k_pos = torch.arange((first_chunk - before) * chunk, (first_chunk + n_chunks) * chunk, device=device)  # ((n+N)*C,)
    q_idx = (q_pos - offset).clamp(0, t_q - 1)  # out-of-range slots read a dummy row, dropped below
    k_idx = k_pos.clamp(0, t_k - 1)  # out-of-range slots are masked below

    q_c = q.index_select(2, q_idx).unflatten(2, (n_chunks, chunk))  # (B, H, n, C, D)
    k_w = k.index_select(2, k_idx).unfold(2, window, chunk)  # (B, H, n, D, W): chunk i and its N predecessors
    v_w = v.index_select(2, k_idx).unfold(2, window, chunk).transpose(-1, -2)  # (B, H, n, W, D)
    k_pos_w = k_pos.unfold(0, window, chunk)  # (n, W)

    allowed = (k_pos_w[:, None, :] >= 0) & (k_pos_w[:, None, :] <= q_pos.view(n_chunks, chunk, 1))  # (n, C, W)
    if key_padding_mask is not None:
        real = key_padding_mask.bool().index_select(1, k_idx).unfold(1, window, chunk)  # (B, n, W)
        allowed = allowed & real[:, None, :, None, :]  # (B, 1, n, C, W)

    # Each chunk is one SDPA problem: fold the chunks into the batch, (B*n, H, C|W, D), so the fused kernels
    # (flash on CPU and GPU) keep memory at O(T*D) rather than the (C, W) scores of every chunk.
    batch, heads, dim = q.shape[0], q.shape[1], q.shape[-1]

    def per_chunk(x: Tensor) -> Tensor:  # (B, H, n, L, D) -> (B*n, H, L, D)
        return x.transpose(1, 2).reshape(batch * n_chunks, heads, x.shape[-2], dim)

    allowed = allowed.expand(batch, 1, n_chunks, chunk, window).transpose(1, 2).reshape(batch * n_chunks, 1, chunk, window)
    row_ok = allowed.any(-1, keepdim=True)  # slots past the queries, fully padded rows: see everything, then zeroed
    out = F.scaled_dot_product_attention(
        per_chunk(q_c), per_chunk(k_w.transpose(-1, -2)), per_chunk(v_w),
        attn_mask=allowed | ~row_ok, dropout_p=dropout_p, scale=scale,
    ).masked_fill(~row_ok, 0.0)  # (B*n, H, C, D)
    out = out.view(batch, n_chunks, heads, chunk, dim).transpose(1, 2).flatten(2, 3)  # (B, H, n*C, D)
    return out[:, :, lead : lead + t_q].to(q.dtype)


def lsh_buckets(x: Tensor, n_hashes: int, n_buckets: int) -> Tensor:
    """Hash (B, H, T, D) vectors into (B, H, n_hashes, T) bucket ids in [0, n_buckets).

    One random rotation R of shape (D, n_hashes, n_buckets // 2) is drawn in fp32 from the default
    generator of x's device and SHARED by all batch rows and heads; bucket = argmax([xR, -xR]).
    ``n_buckets == 1`` puts every token in bucket 0 and draws nothing.
    """
    b, h, t, d = x.shape
    if n_buckets == 1:
        return torch.zeros(b, h, n_hashes, t, dtype=torch.long, device=x.device)
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"lsh_num_buckets must be 1 or a positive even number, got {n_buckets}")
    rotations = torch.randn(d, n_hashes, n_buckets // 2, device=x.device, dtype=torch.float32)
    rotated = torch.einsum("bhtd,drk->bhrtk", x.detach().float(), rotations)  # (B, H, R, T, nb/2)
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


def _gather_positions(x: Tensor, pos: Tensor) -> Tensor:
    """Rows of x (B, H, T, D) at per-(batch, head) positions pos (B, H, *S) -> (B, H, *S, D); -1 reads row 0."""
    idx = pos.clamp(min=0).flatten(2)  # (B, H, N)
    rows = x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    return rows.view(*pos.shape, x.shape[-1])


def lsh_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, dropout_p: float, scale: float, config: Any
) -> Tensor:
    """Reformer LSH attention for shared query-key (pass the same tensor as q and k).

    Keys are normalised to unit length; scores are ``scale * q . k_unit``. For each of
    ``config.lsh_num_hashes`` rounds, tokens are hashed with ``lsh_buckets`` (one fresh rotation per
    call, shared by batch and heads), stably sorted by (bucket, position), and the sorted sequence is
    cut into chunks of ``config.lsh_chunk_length`` (the tail chunk padded). Each chunk attends to itself
    and its predecessor (the first chunk has none), with a causal mask by original position, padding
    keys masked, and a query's own key scored ``LSH_SELF_MASK_VALUE`` so it wins only when alone. Rounds
    are merged by a softmax over their per-query logsumexps. Memory is linear in T.

    Cached decoding (Tq < Tk) cannot reuse the hashing, so it falls back to exact causal attention over
    all cached keys with the same key normalisation, self-mask and padding rules (dense (Tq, Tk)
    scores, no rotations drawn). With several buckets, chunk boundaries depend on every token's
    bucket, so a future token's q/k can change which PAST keys an earlier query sees (never future
    values); this is inherent to Reformer-style causal LSH.
    """
    n_hashes, n_buckets, chunk = int(config.lsh_num_hashes), int(config.lsh_num_buckets), int(config.lsh_chunk_length)
    if n_hashes < 1 or chunk < 1:
        raise ValueError(f"bad lsh config: num_hashes={n_hashes}, chunk_length={chunk}")
    k = F.normalize(_upcast(k), dim=-1, eps=1e-6).to(k.dtype)
    t_q, t = q.shape[-2], k.shape[-2]
    if t_q < t:
        return _dense_attention(q, k, v, key_padding_mask, dropout_p, scale, self_mask_value=LSH_SELF_MASK_VALUE)

    b, h, _, d = q.shape
    n_chunks = -(-t // chunk)
    pos = torch.arange(t, device=q.device)
    buckets = lsh_buckets(k, n_hashes, n_buckets)  # (B, H, R, T)
    perm = torch.argsort(buckets * t + pos, dim=-1, stable=True)  # (B, H, R, T): sorted slot -> position
    # Sorted positions padded to whole chunks with -1 (no token); keys see their chunk + predecessor.
    q_pos = F.pad(perm, (0, n_chunks * chunk - t), value=-1)  # (B, H, R, n*C)
    k_pos = F.pad(q_pos, (chunk, 0), value=-1).unfold(-1, 2 * chunk, chunk)  # (B, H, R, n, 2C)
    q_pos = q_pos.unflatten(-1, (n_chunks, chunk))  # (B, H, R, n, C)

    q_c = _gather_positions(q, q_pos)  # (B, H, R, n, C, D)
    k_c = _gather_positions(k, k_pos)  # (B, H, R, n, 2C, D)
    v_c = _gather_positions(v, k_pos)  # (B, H, R, n, 2C, D)

    qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)  # (B, H, R, n, C, 1), (B, H, R, n, 1, 2C)
    allowed = (kp >= 0) & (kp <= qp)  # (B, H, R, n, C, 2C); causal by original position
    if key_padding_mask is not None:
        real = key_padding_mask.bool()[:, None, :].expand(b, h, t)  # (B, H, T)
        allowed = allowed & real.gather(2, k_pos.clamp(min=0).flatten(2)).view_as(k_pos).unsqueeze(-2)

    scores = _upcast((q_c * scale) @ k_c.transpose(-1, -2))  # (B, H, R, n, C, 2C)
    scores = scores.masked_fill(kp == qp, LSH_SELF_MASK_VALUE).masked_fill(~allowed, _mask_value(scores))
    lse = scores.logsumexp(-1, keepdim=True)  # (B, H, R, n, C, 1)
    probs = torch.exp(scores - lse) * allowed.any(-1, keepdim=True)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = (probs.to(v.dtype) @ v_c).flatten(3, 4)[:, :, :, :t]  # (B, H, R, T, D) in sorted order

    # Undo the sort: inverse[..., p] is the sorted slot of position p.
    inverse = torch.empty_like(perm).scatter_(-1, perm, pos.expand_as(perm))  # (B, H, R, T)
    out = out.gather(3, inverse.unsqueeze(-1).expand(-1, -1, -1, -1, d))  # (B, H, R, T, D)
    lse = lse.flatten(3, 4)[:, :, :, :t].gather(3, inverse.unsqueeze(-1))  # (B, H, R, T, 1)
    weights = lse.softmax(dim=2)  # combine rounds by their logsumexps
    return (weights * _upcast(out)).sum(dim=2).to(q.dtype)


ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {
    "full": full_attention,
    "local": local_attention,
    "lsh": lsh_attention,
    "eager": eager_attention,
}
