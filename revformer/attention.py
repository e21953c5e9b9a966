"""Attention kernels for revformer (depends on torch only; shipped beside the Hub model code).

Every kernel has the same signature and is picked by name from ``ATTENTION_FUNCTIONS``::

    kernel(q, k, v, *, key_padding_mask, dropout_p, scale, config) -> Tensor

- ``q``: (B, H, Tq, D); ``k``, ``v``: (B, H, Tk, D) with Tk >= Tq. The queries are the *last* Tq
  positions of the key sequence: query i sits at key index Tk - Tq + i (Tq == Tk in training,
  Tq < Tk in cached generation).
- ``key_padding_mask``: (B, Tk) bool, True = real token, or None.
- Attention is causal by key index, and the set of keys a query sees depends on earlier tokens only
  (``lsh`` included). Padding keys are never seen, and ``local`` / ``lsh`` windows count real tokens
  only, so a left-padded row gives its unpadded result. A query row with no admissible key (e.g. a
  left-padding position) returns zeros, never NaN. The result is (B, H, Tq, D) in q's dtype.
- ``config``: any object with ``local_chunk_length``, ``local_num_chunks_before``,
  ``lsh_num_buckets``, ``lsh_num_hashes`` and ``lsh_chunk_length``.

Randomness (dropout, LSH rotations) is drawn from the default generator of q's device, so
restoring the RNG state replays a call bit for bit (the reversible engine relies on this). With
``dropout_p == 0`` the ``eager``, ``full`` and ``local`` kernels draw nothing; ``lsh`` draws only
its rotations (none when ``lsh_num_buckets == 1`` or when fixed ``rotations`` are passed, as in eval mode).

Non-SDPA kernels run the matmuls in the input dtype and the masking/softmax in at least fp32.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ATTENTION_FUNCTIONS",
    "AttentionFunction",
    "LSH_SELF_MASK_VALUE",
    "eager_attention",
    "full_attention",
    "local_attention",
    "lsh_attention",
    "lsh_buckets",
    "lsh_rotations",
]

AttentionFunction = Callable[..., Tensor]

# Score given to a query's own key in LSH attention (shared-QK makes q.k_self the largest score,
# so it is penalised). Finite and far above the mask value: it wins only when nothing else is allowed.
LSH_SELF_MASK_VALUE = -1e5

# Score elements (fp32) one group of LSH blocks may hold at once: the group's scores are the transient peak, and
# under autograd each group is checkpointed, so only its inputs and outputs are kept for backward. Hashing works
# on slices of as many projections.
LSH_GROUP_SCORES = 2**20


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


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of x (B, H, T, D) at per-batch-row indices idx (B, N) -> (B, H, N, D)."""
    return x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


def _local_chunks(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, dropout_p: float, scale: float, chunk: int,
    before: int,
) -> Tensor:
    """`local` on index-aligned chunks: query at key index p sees keys j <= p with j // C >= p // C - N."""
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

    allowed = allowed.expand(batch, 1, n_chunks, chunk, window).transpose(1, 2)
    allowed = allowed.reshape(batch * n_chunks, 1, chunk, window)
    row_ok = allowed.any(-1, keepdim=True)  # slots past the queries, fully padded rows: see everything, then zeroed
    out = F.scaled_dot_product_attention(
        per_chunk(q_c), per_chunk(k_w.transpose(-1, -2)), per_chunk(v_w),
        attn_mask=allowed | ~row_ok, dropout_p=dropout_p, scale=scale,
    ).masked_fill(~row_ok, 0.0)  # (B*n, H, C, D)
    out = out.view(batch, n_chunks, heads, chunk, dim).transpose(1, 2).flatten(2, 3)  # (B, H, n*C, D)
    return out[:, :, lead : lead + t_q].to(q.dtype)


def _gathered_attention(
    q: Tensor, k_rows: Tensor, v_rows: Tensor, allowed: Tensor, scale: float, dropout_p: float,
    is_self: Tensor | None = None, dropout: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Each query against its own gathered keys: q (..., Tq, D), k/v_rows (..., Tq, L, D), allowed (..., Tq, L).

    Returns the output (..., Tq, D) and the per-query logsumexp (..., Tq); rows with no allowed key give 0.
    Used for cached decoding, where the few new queries each gather their window instead of whole blocks.
    """
    scores = _upcast((q.unsqueeze(-2) * scale) @ k_rows.transpose(-1, -2)).squeeze(-2)  # (..., Tq, L)
    if is_self is not None:
        scores = scores.masked_fill(is_self, LSH_SELF_MASK_VALUE)
    scores = scores.masked_fill(~allowed, _mask_value(scores))
    lse = scores.logsumexp(-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)) * allowed.any(-1, keepdim=True)
    if dropout is not None:
        probs = dropout(probs)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = (probs.to(v_rows.dtype).unsqueeze(-2) @ v_rows).squeeze(-2)
    return out, lse


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, dropout_p: float, scale: float, config: Any
) -> Tensor:
    """Causal chunked attention with memory linear in length, its chunks aligned on real tokens.

    Number the real (unpadded) tokens of a row 0, 1, 2, ... (their rank r). Chunks are ``config.local_chunk_length``
    (C) real tokens long; the real query of rank r attends to the real keys of rank s <= r with
    s // C >= r // C - ``config.local_num_chunks_before`` (N). Padding never shifts the chunk borders, so a
    left-padded row gives its unpadded logits. Without padding the rank is the key index; the window depends only
    on ranks, so a cached call (Tq < Tk) gives exactly the rows the full-sequence call gives. Pad queries give 0.
    """
    chunk, before = int(config.local_chunk_length), int(config.local_num_chunks_before)
    if chunk < 1 or before < 0:
        raise ValueError(f"bad local attention config: chunk={chunk}, chunks_before={before}")
    if key_padding_mask is None:
        return _local_chunks(q, k, v, None, dropout_p, scale, chunk, before)
    t_q, t_k = q.shape[-2], k.shape[-2]
    real = key_padding_mask.bool()  # (B, Tk)
    pos = torch.arange(t_k, device=q.device)
    order = torch.argsort((~real).long() * t_k + pos, dim=-1)  # (B, Tk): real positions first, in order, then pads
    q_real = real[:, t_k - t_q :, None, None].transpose(1, 2)  # (B, 1, Tq, 1)
    if t_q == t_k:
        # Move the real tokens to the front of each row (pads trail, masked as keys): index == rank there.
        compact = _local_chunks(
            _rows(q, order), _rows(k, order), _rows(v, order), real.gather(1, order), dropout_p, scale, chunk, before
        )
        inverse = torch.argsort(order, dim=-1)
        return (_rows(compact, inverse) * q_real).to(q.dtype)
    # Cached decoding: each new query gathers the (N + 1) * C ranks of its window.
    rank = real.long().cumsum(-1)[:, t_k - t_q :] - 1  # (B, Tq)
    span = torch.arange((before + 1) * chunk, device=q.device)
    k_rank = (rank.clamp(min=0) // chunk - before)[..., None] * chunk + span  # (B, Tq, L)
    allowed = (k_rank >= 0) & (k_rank <= rank[..., None]) & real[:, t_k - t_q :, None]  # (B, Tq, L)
    k_pos = order.gather(1, k_rank.clamp(0, t_k - 1).flatten(1))  # (B, Tq*L)
    k_rows = _rows(k, k_pos).unflatten(2, (t_q, -1))  # (B, H, Tq, L, D)
    v_rows = _rows(v, k_pos).unflatten(2, (t_q, -1))
    out, _ = _gathered_attention(q, k_rows, v_rows, allowed[:, None], scale, dropout_p)
    return out.to(q.dtype)


def lsh_buckets(x: Tensor, n_hashes: int, n_buckets: int, rotations: Tensor | None = None) -> Tensor:
    """Hash (B, H, T, D) vectors into (B, H, n_hashes, T) bucket ids in [0, n_buckets).

    ``rotations`` (D, n_hashes, n_buckets // 2), or when None one drawn in fp32 from the default generator of x's
    device, is SHARED by all batch rows and heads; bucket = argmax([xR, -xR]). ``n_buckets == 1`` puts every token
    in bucket 0 and draws nothing.
    """
    b, h, t, d = x.shape
    if n_buckets == 1:
        return torch.zeros(b, h, n_hashes, t, dtype=torch.long, device=x.device)
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"lsh_num_buckets must be 1 or a positive even number, got {n_buckets}")
    if rotations is None:
        rotations = torch.randn(d, n_hashes, n_buckets // 2, device=x.device, dtype=torch.float32)
    elif tuple(rotations.shape) != (d, n_hashes, n_buckets // 2):
        raise ValueError(
            f"LSH rotations have shape {tuple(rotations.shape)}, expected (head_dim, lsh_num_hashes, "
            f"lsh_num_buckets // 2) = {(d, n_hashes, n_buckets // 2)}; build them with lsh_rotations()."
        )
    rotations = rotations.to(x.device, torch.float32)
    # argmax([xR, -xR]) without the concatenation, over slices of T: the (T, n_buckets / 2) projections would
    # otherwise be the largest tensor of a long sequence (O(T^2 / chunk) with one bucket per chunk).
    step = max(1, LSH_GROUP_SCORES // (b * h * n_hashes * (n_buckets // 2)))
    out = []
    for start in range(0, t, step):
        rotated = torch.einsum("bhtd,drk->bhrtk", x[:, :, start : start + step].detach().float(), rotations)
        top, top_idx = rotated.max(dim=-1)
        bottom, bottom_idx = rotated.min(dim=-1)
        # Ties go to the first half, as argmax over the concatenation would.
        out.append(torch.where(top >= -bottom, top_idx, bottom_idx + n_buckets // 2))
    return torch.cat(out, dim=-1)


def lsh_rotations(
    head_dim: int, n_hashes: int, n_buckets: int, seed: int, device: torch.device | str = "cpu"
) -> Tensor | None:
    """Fixed LSH rotations (head_dim, n_hashes, n_buckets // 2) from ``seed`` (a CPU generator, so the same on
    every device); None for one bucket. Used in eval mode and generation, where logits must be deterministic."""
    if n_buckets == 1:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(head_dim, n_hashes, n_buckets // 2, generator=generator).to(device)


def _gather_positions(x: Tensor, pos: Tensor) -> Tensor:
    """Rows of x (B, H, T, D) at per-(batch, head) positions pos (B, H, *S) -> (B, H, *S, D); -1 reads row 0."""
    idx = pos.clamp(min=0).flatten(2)  # (B, H, N)
    rows = x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    return rows.view(*pos.shape, x.shape[-1])


def _seen_in_earlier_round(q_pos: Tensor, k_pos: Tensor, codes: Tensor, window: int) -> Tensor:
    """For hash rounds 1..R-1: True where key k_pos is already in query q_pos's window of an earlier round.

    Such keys are dropped from the later round, so every key is counted once. q_pos and k_pos (B, H, R, ...)
    broadcast against each other; codes (B, H, R, T) = bucket * (T + W + 1) + sorted slot of each position, so
    that "same bucket and 0 <= slot(q) - slot(k) <= W" is one difference of codes. Returns (B, H, R - 1, ...).
    """
    seen = None
    for r in range(codes.shape[2] - 1):  # round r's windows, checked against every later round's pairs
        q_r, k_r = q_pos[:, :, r + 1 :], k_pos[:, :, r + 1 :]
        cq = codes[:, :, r].gather(2, q_r.clamp(min=0).flatten(2)).view_as(q_r)
        ck = codes[:, :, r].gather(2, k_r.clamp(min=0).flatten(2)).view_as(k_r)
        diff = cq - ck
        in_window = (diff >= 0) & (diff <= window)
        if seen is None:
            seen = in_window
        else:
            seen[:, :, r:] |= in_window
    return seen


def _masked_softmax(scores: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax of ``scores`` over the allowed entries of the last axis and its logsumexp; rows with no allowed
    entry give probabilities 0 and logsumexp ``finfo.min`` (so they weigh nothing when rounds are merged)."""
    blocked = ~allowed
    row_max = scores.masked_fill(blocked, float("-inf")).amax(-1, keepdim=True).detach()  # shift-invariant
    row_ok = row_max > float("-inf")
    row_max = torch.where(row_ok, row_max, 0.0)
    # exp's vectorised path needs arguments in its normal range: clamp to [-80, 0] (exp(-80) ~ 2e-35 against the
    # row maximum's 1, far below rounding); masked entries are zeroed after.
    e = torch.exp((scores - row_max).clamp(-80.0, 0.0)).masked_fill(blocked, 0.0)
    total = e.sum(-1, keepdim=True).clamp(min=torch.finfo(e.dtype).tiny)
    lse = torch.where(row_ok, row_max + total.log(), torch.finfo(e.dtype).min)
    return e / total, lse.squeeze(-1)


def _lsh_blocks(
    q_g: Tensor, k_prev: Tensor, k_g: Tensor, v_prev: Tensor, v_g: Tensor, pos_prev: Tensor, pos_g: Tensor,
    start_g: Tensor, *, first_block: int, codes: Tensor, window: int, scale: float, dropout_p: float,
    dropout_seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Blocks first_block .. first_block + g - 1 of the sorted sequence: queries, keys, values and positions
    (B, H, R, g*C[, D]), the first slot of each query's bucket run (B, H, R, g*C), and the block before them
    (``*_prev``, (B, H, R, C[, D])). Returns the sorted outputs (B, H, R, g*C, D) and logsumexps (B, H, R, g*C)."""
    k_g, v_g = torch.cat([k_prev, k_g], dim=-2), torch.cat([v_prev, v_g], dim=-2)
    pos_g = torch.cat([pos_prev, pos_g], dim=-1)
    c = window
    g = q_g.shape[-2] // c
    q_blk = q_g.unflatten(-2, (g, c))  # (B, H, R, g, C, D)
    k_win = k_g.unfold(-2, 2 * c, c)  # (B, H, R, g, D, 2C): block i and its predecessor
    v_win = v_g.unfold(-2, 2 * c, c).transpose(-1, -2)  # (B, H, R, g, 2C, D)
    device = q_g.device
    i = torch.arange(c, device=device)[:, None]
    j = torch.arange(2 * c, device=device)[None, :]
    # Key j of a block's window is c + i - j sorted slots before query i: the band keeps the W = C slots before the
    # query and the query itself; keys before the start of the query's bucket run are other buckets.
    band = (j >= i) & (j <= i + c)  # (C, 2C)
    k_slot = (first_block - 1 + torch.arange(g, device=device))[:, None] * c + j  # (g, 2C) global sorted slots
    allowed = band & (k_slot[:, None, :] >= start_g.unflatten(-1, (g, c)).unsqueeze(-1))  # (B, H, R, g, C, 2C)
    kp = pos_g.unfold(-1, 2 * c, c)  # (B, H, R, g, 2C) original positions, -1 = empty slot
    qp = kp[..., c:]  # a block's queries are the second half of its key window
    if codes.shape[2] > 1:
        allowed[:, :, 1:] &= ~_seen_in_earlier_round(qp.unsqueeze(-1), kp.unsqueeze(-2), codes, window)
    scores = _upcast((q_blk * scale) @ k_win)  # (B, H, R, g, C, 2C)
    scores = scores.masked_fill(j == i + c, LSH_SELF_MASK_VALUE)  # the query's own key
    probs, lse = _masked_softmax(scores, allowed)
    if dropout_seed is not None:
        probs = _pair_dropout(probs, qp.unsqueeze(-1), kp.unsqueeze(-2), codes.shape[-1], dropout_seed, dropout_p)
    out = probs.to(v_win.dtype) @ v_win  # (B, H, R, g, C, D)
    return out.flatten(3, 4), lse.flatten(3, 4)


def _pair_dropout(probs: Tensor, q_pos: Tensor, k_pos: Tensor, t: int, seed: Tensor, p: float) -> Tensor:
    """Dropout on LSH attention weights whose mask is a hash of (row, head, round, query position, key position).

    LSH computes each pair in a sorted layout that later tokens can rearrange; a mask drawn in that layout would
    let a later token decide which of an earlier query's weights are dropped. probs (B, H, R, *Q, K), q_pos
    (B, H, R, *Q, 1) and k_pos (B, H, R, *Q | 1, K); ``seed`` (int64) is drawn once per call from the RNG.
    """
    b, h, r = probs.shape[:3]
    lead = torch.arange(b * h * r, device=probs.device).view(b, h, r, *([1] * (probs.dim() - 3)))
    z = (lead * t + q_pos.clamp(min=0)) * t + k_pos.clamp(min=0) + seed
    # splitmix64 finaliser (int64 arithmetic wraps), then the low 24 bits as a uniform number in [0, 1).
    z = (z ^ (z >> 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * -7723592293110705685  # 0x94D049BB133111EB
    z = z ^ (z >> 31)
    keep = (z & 0xFFFFFF).to(torch.float32) >= p * 2**24
    return probs * keep / (1.0 - p)


def lsh_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    scale: float,
    config: Any,
    rotations: Tensor | None = None,
) -> Tensor:
    """Strictly causal LSH attention for shared query-key (pass the same tensor as q and k).

    Keys are normalised to unit length; scores are ``scale * q . k_unit``. For each of ``config.lsh_num_hashes``
    rounds, tokens are hashed with ``lsh_buckets`` (``rotations``, or fresh ones from the default generator),
    pad tokens get a bucket of their own, and positions are sorted by (bucket, position). A query attends to the
    W = ``config.lsh_chunk_length`` entries just before it in that order that share its bucket — its W most recent
    earlier same-bucket real tokens, whatever comes later — and to itself, scored ``LSH_SELF_MASK_VALUE`` so it
    wins only when alone. A key that several rounds select is counted once (kept in its first round), so merging
    the rounds by their logsumexps is exactly a softmax over the union of the windows.

    The set of keys a query sees depends on earlier tokens only, so the kernel is strictly causal, ignores padding
    and decodes with a cache exactly (each new query gathers its W + 1 window slots). Training works on blocks of
    W sorted slots, each attending to itself and its predecessor under a band + bucket mask, in groups of blocks
    checkpointed under autograd: memory linear in T.
    """
    n_hashes, n_buckets, window = int(config.lsh_num_hashes), int(config.lsh_num_buckets), int(config.lsh_chunk_length)
    if n_hashes < 1 or window < 1:
        raise ValueError(f"bad lsh config: num_hashes={n_hashes}, chunk_length={window}")
    k = F.normalize(_upcast(k), dim=-1, eps=1e-6).to(k.dtype)
    b, h, t_q, d = q.shape
    t = k.shape[-2]
    pos = torch.arange(t, device=q.device)
    buckets = lsh_buckets(k, n_hashes, n_buckets, rotations)  # (B, H, R, T)
    if key_padding_mask is not None:
        buckets = buckets.masked_fill(~key_padding_mask.bool()[:, None, None, :], n_buckets)
    perm = torch.argsort(buckets * t + pos, dim=-1)  # (B, H, R, T): sorted slot -> position (keys are unique)
    slots = torch.empty_like(perm).scatter_(-1, perm, pos.expand_as(perm))  # position -> sorted slot
    codes = buckets * (t + window + 1) + slots  # same bucket and slot distance in [0, W] <=> code distance in [0, W]
    seed = torch.randint(-(2**62), 2**62, (), device=q.device) if dropout_p > 0.0 else None

    if t_q < t:  # cached decoding: each new query gathers the W + 1 slots ending at its own
        offset = t - t_q
        q_pos = pos[offset:].view(1, 1, 1, t_q).expand(b, h, n_hashes, t_q)
        k_slot = slots[..., offset:, None] - torch.arange(window, -1, -1, device=q.device)  # (B, H, R, Tq, W+1)
        k_pos = perm.gather(-1, k_slot.clamp(min=0).flatten(-2)).view_as(k_slot)
        k_bkt = buckets.gather(-1, k_pos.flatten(-2)).view_as(k_pos)
        allowed = (k_slot >= 0) & (k_bkt == buckets[..., offset:, None]) & (k_bkt < n_buckets)
        if n_hashes > 1:
            allowed[:, :, 1:] &= ~_seen_in_earlier_round(q_pos.unsqueeze(-1), k_pos, codes, window)
        drop = None if seed is None else partial(
            _pair_dropout, q_pos=q_pos.unsqueeze(-1), k_pos=k_pos, t=t, seed=seed, p=dropout_p
        )
        out, lse = _gathered_attention(
            q.unsqueeze(2).expand(b, h, n_hashes, t_q, d), _gather_positions(k, k_pos), _gather_positions(v, k_pos),
            allowed, scale, dropout_p, is_self=k_pos == q_pos.unsqueeze(-1), dropout=drop,
        )  # (B, H, R, Tq, D), (B, H, R, Tq)
    else:
        c = window
        n = -(-t // c)
        sorted_bkt = buckets.gather(-1, perm)  # (B, H, R, T)
        new_run = F.pad(sorted_bkt[..., 1:] != sorted_bkt[..., :-1], (1, 0), value=True)
        run_start = torch.where(new_run, pos, 0).cummax(-1).values  # first sorted slot of each slot's bucket
        never = (n + 1) * c  # above every key slot: pad tokens (and slots past the end) attend to nothing
        run_start = F.pad(run_start.masked_fill(sorted_bkt == n_buckets, never), (0, n * c - t), value=never)

        per_block = b * h * n_hashes * 2 * c * c * (4 if seed is not None else 1)  # the dropout hash is int64
        group = max(1, LSH_GROUP_SCORES // per_block)

        # Sorted order padded to whole blocks, split into groups of blocks: one split (not a slice per group,
        # whose backward would fill a whole-sequence gradient each time).
        def sorted_groups(x: Tensor) -> tuple[Tensor, ...]:
            return F.pad(_gather_positions(x, perm), (0, 0, 0, n * c - t)).split(group * c, dim=-2)

        q_p, k_p, v_p = sorted_groups(q), sorted_groups(k), sorted_groups(v)  # (B, H, R, group*C, D) each
        pos_p = F.pad(perm, (0, n * c - t), value=-1).split(group * c, dim=-1)
        start_p = run_start.split(group * c, dim=-1)
        checkpointed = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        empty, no_pos = q.new_zeros(b, h, n_hashes, c, d), perm.new_full((b, h, n_hashes, c), -1)
        outs, lses = [], []
        for i in range(len(q_p)):
            fn = partial(_lsh_blocks, first_block=i * group, codes=codes, window=c, scale=scale, dropout_p=dropout_p,
                         dropout_seed=seed)  # fmt: skip
            prev = (empty, empty, no_pos) if i == 0 else (k_p[i - 1][..., -c:, :], v_p[i - 1][..., -c:, :],
                                                          pos_p[i - 1][..., -c:])  # fmt: skip
            args = (q_p[i], prev[0], k_p[i], prev[1], v_p[i], prev[2], pos_p[i], start_p[i])
            out_g, lse_g = checkpoint(fn, *args, use_reentrant=False) if checkpointed else fn(*args)
            outs.append(out_g)
            lses.append(lse_g)
        # Back from sorted slots to positions.
        out = torch.cat(outs, dim=3).gather(3, slots.unsqueeze(-1).expand(-1, -1, -1, -1, d))  # (B, H, R, T, D)
        lse = torch.cat(lses, dim=3).gather(3, slots)  # (B, H, R, T)
    weights = lse.softmax(dim=2).unsqueeze(-1)  # rounds hold disjoint keys: this is one softmax over their union
    return (weights * _upcast(out)).sum(dim=2).to(q.dtype)


ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {
    "full": full_attention,
    "local": local_attention,
    "lsh": lsh_attention,
    "eager": eager_attention,
}
