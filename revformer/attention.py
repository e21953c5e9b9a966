"""Attention for revformer: the masking rules, the dense path and the linear-memory kernels (torch only; shipped
beside the Hub model code).

The rules. Attention is causal by key index, queries being the *last* Tq of the Tk keys (query i sits at key index
Tk - Tq + i: Tq == Tk in training, Tq < Tk in cached generation). Padding keys are never seen; packed documents never
see each other; ``local`` and ``lsh`` windows count real tokens only, so a left-padded row gives its unpadded
result; the set of keys a query sees depends on earlier tokens only (``lsh`` included). A query row with no
admissible key (a left-padding position) returns zeros, never NaN.

Two ways to apply them:
- dense (``dense_allowed`` builds the (Tq, Tk) mask, ``dense_attention`` runs any kernel with transformers'
  attention-interface signature over it: ``eager_attention`` here, sdpa or flash from transformers). ``full``
  layers always go this way; every layer does under the ``eager`` implementation, which returns probabilities.
- linear memory, for ``local`` and ``lsh`` layers, picked by kind from ``ATTENTION_FUNCTIONS``::

      kernel(q, k, v, *, key_padding_mask, dropout_p, scale, config) -> Tensor

  ``q``: (B, H, Tq, D); ``k``, ``v``: (B, H, Tk, D); ``key_padding_mask``: (B, Tk) bool, True = real token, or
  None; ``config``: any object with ``local_chunk_length``, ``local_num_chunks_before``, ``lsh_num_buckets``,
  ``lsh_num_hashes`` and ``lsh_chunk_length``. The result is (B, H, Tq, D) in q's dtype. Packed documents go
  through ``unpack_documents`` first, a row each.

Randomness (dropout, LSH rotations) is drawn from the default generator of q's device, so restoring the RNG state
replays a call bit for bit (the reversible engine relies on this). With ``dropout_p == 0`` ``local`` draws nothing;
``lsh`` draws only its rotations (none when ``lsh_num_buckets == 1`` or when fixed ``rotations`` are passed, as in
eval mode). Non-SDPA kernels run the matmuls in the input dtype and the masking/softmax in at least fp32.
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
    "apply_rotary",
    "attention_inputs",
    "causal_allowed",
    "dense_allowed",
    "dense_attention",
    "eager_attention",
    "is_own_key",
    "local_attention",
    "lsh_attention",
    "lsh_buckets",
    "linear_attention",
    "lsh_rotations",
    "packed_documents",
    "repeat_kv",
    "same_document",
    "unpack_documents",
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


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` (B, H, T, D) by the angles whose cos/sin are (B, T, D)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * groups, T, D): each key/value head repeated for the query heads it serves."""
    if groups == 1:
        return x
    batch, heads, t, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, t, dim).reshape(batch, heads * groups, t, dim)


# ------------------------------------------------------------------------------------------- the rules, densely


def causal_allowed(t_q: int, t_k: int, device: torch.device) -> Tensor:
    """(Tq, Tk) bool: query i (at key index Tk - Tq + i) may see keys j <= its own index."""
    return torch.arange(t_k, device=device)[None, :] <= torch.arange(t_k - t_q, t_k, device=device)[:, None]


def is_own_key(t_q: int, t_k: int, device: torch.device) -> Tensor:
    """(Tq, Tk) bool: the key at query i's own index (Tk - Tq + i)."""
    return torch.arange(t_k, device=device) == torch.arange(t_k - t_q, t_k, device=device)[:, None]


def same_document(document_ids: Tensor | None, t_q: int) -> Tensor | None:
    """(B, 1, Tq, Tk) bool: query and key lie in the same packed document; None without documents."""
    if document_ids is None:
        return None
    return (document_ids[:, -t_q:, None] == document_ids[:, None, :])[:, None]


def packed_documents(position_ids: Tensor) -> Tensor | None:
    """(B, T) index of each token's document in a padding-free batch, where positions restart at every document;
    None when every row holds one document."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    documents = (step != 1).cumsum(-1)
    if not torch.compiler.is_compiling() and bool((documents[:, -1] == 0).all()):
        return None
    return documents


def attention_inputs(
    attention_mask: Tensor | None, position_ids: Tensor | None, batch: int, seq: int, past: int, cached: bool,
    device: torch.device,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """What attention needs to know of the positions of a (B, T) input that follows `past` cached tokens: the
    padding mask (B, past + T) bool (True = real token; None when nothing is padded), the position ids (B|1, T) and
    the packed-document ids (B, T), or None.

    `attention_mask` is a (B, past + T) padding mask, or a 4D causal mask (B, 1, Tq, Tk) as generate() builds for a
    static cache: its last query row sees exactly the real keys so far, and the static cache's unfilled slots beyond
    them are dropped. Without position ids, positions count real tokens, as generate() does: a left-padded row then
    gets its unpadded positions (which `lsh` hashing depends on, not just relative offsets). Documents come from
    position ids that restart (padding-free batches), only without padding and cache.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        last = attention_mask[:, 0, -1, :]
        real = last if last.dtype == torch.bool else last == 0  # additive masks: 0 where allowed
        attention_mask = real[:, : past + attention_mask.shape[-2]].long()
    padded = attention_mask is not None and not bool(attention_mask.all())
    key_padding_mask = attention_mask.bool() if padded else None
    document_ids = None
    if position_ids is not None and past == 0 and not cached and key_padding_mask is None:
        document_ids = packed_documents(position_ids.expand(batch, -1))
    if position_ids is None and attention_mask is not None and attention_mask.shape == (batch, past + seq):
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
    if position_ids is None:
        position_ids = torch.arange(past, past + seq, device=device).unsqueeze(0)
    return key_padding_mask, position_ids, document_ids


def dense_allowed(
    kind: str,
    t_q: int,
    t_k: int,
    key_padding_mask: Tensor | None,
    document_ids: Tensor | None,
    config: Any,
    buckets: Tensor | None = None,
) -> Tensor:
    """Which keys each query sees under `kind`'s rule, as a dense (B|1, 1|H, Tq, Tk) bool mask.

    The rules of the kernels below, written with (Tq, Tk) matrices for the dense paths (eager attention, which
    materializes probabilities, and transformers' kernels for `full` layers): causal, padding never seen, and within
    one packed document (document_ids (B, Tk)). `local`: windows of `local_chunk_length` real tokens of the
    document, the query's chunk and `local_num_chunks_before` before it. `lsh` (buckets (B, H, R, Tk)): in some
    round, a key of the query's bucket among its `lsh_chunk_length` most recent earlier same-bucket real tokens, or
    the query itself.
    """
    device = next((t.device for t in (key_padding_mask, buckets, document_ids) if t is not None), torch.device("cpu"))
    allowed = causal_allowed(t_q, t_k, device)[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :] & key_padding_mask[:, None, -t_q:, None]
    same_doc = same_document(document_ids, t_q)
    if same_doc is not None:
        allowed = allowed & same_doc
    if kind == "full":
        return allowed
    # Rank of each token among the real tokens of its document (and, for lsh, of its bucket) before it.
    full_allowed = causal_allowed(t_k, t_k, device)[None, None]  # (1, 1, Tk, Tk)
    if key_padding_mask is not None:
        full_allowed = full_allowed & key_padding_mask[:, None, None, :]
    if document_ids is not None:
        full_allowed = full_allowed & same_document(document_ids, t_k)
    if kind == "local":
        rank = full_allowed.sum(-1) - 1  # (B|1, 1, Tk)
        chunk, before = config.local_chunk_length, config.local_num_chunks_before
        q_chunk = (rank[..., -t_q:] // chunk)[..., :, None]
        return allowed & (rank[..., None, :] // chunk >= q_chunk - before)
    if kind != "lsh" or buckets is None:
        raise ValueError(f"dense_allowed: unknown kind {kind!r} (or lsh without buckets)")
    same = buckets[..., :, None] == buckets[..., None, :]  # (B, H, R, Tk, Tk)
    in_bucket = full_allowed.unsqueeze(2) & same
    rank = in_bucket.sum(-1) - 1  # (B, H, R, Tk): same-bucket real tokens of the document before each token
    window = (rank[..., -t_q:, None] - rank[..., None, :]) <= config.lsh_chunk_length
    seen = (same[..., -t_q:, :] & window & allowed.unsqueeze(2)).any(2)  # union over the rounds
    # A query always sees itself (scored low: it wins only when alone).
    return seen | (allowed & is_own_key(t_q, t_k, device))


def eager_attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    self_score: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Explicit-score attention with transformers' attention-interface signature: the `eager` implementation.

    query (B, H, Tq, D), key/value (B, H_kv, Tk, D); attention_mask (B|1, 1|H, Tq, Tk) bool (True = may look) or
    additive float, or None for causal attention with the queries at the end of the keys. `self_score` replaces each
    query's score of its own key (the LSH rule). Returns the output (B, Tq, H, D) and the probabilities
    (B, H, Tq, Tk), zero where a query cannot look (and for a query that sees nothing).
    """
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups` queries
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    t_q, t_k = query.shape[-2], key.shape[-2]
    scores = _upcast((query * scaling) @ key.transpose(-1, -2))  # q pre-scaled against fp16 overflow
    if self_score is not None:
        scores = scores.masked_fill(is_own_key(t_q, t_k, query.device), self_score)
    if attention_mask is None:
        attention_mask = causal_allowed(t_q, t_k, query.device)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, _mask_value(scores))
        # Finite mask value + zeroing keeps a row that sees nothing at 0 (no NaN in values or gradients).
        probs = scores.softmax(-1) * attention_mask.any(-1, keepdim=True)
        probs = probs * attention_mask
    else:
        probs = (scores + attention_mask).softmax(-1)
    probs = F.dropout(probs, p=dropout, training=dropout > 0.0)
    out = (probs.to(value.dtype) @ value).to(query.dtype)
    return out.transpose(1, 2), probs.to(query.dtype)


def dense_attention(
    interface: AttentionFunction,
    module: Any,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kind: str,
    key_padding_mask: Tensor | None,
    document_ids: Tensor | None,
    dropout_p: float,
    scale: float,
    config: Any,
    rotations: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`kind`'s rule applied densely: `interface` (a function with transformers' attention-interface signature:
    `eager_attention`, sdpa, flash, ...) over the keys `dense_allowed` gives. Returns (B, Tq, H, D) and the
    probabilities (None where the interface gives none).

    q (B, H, Tq, D), k/v (B, H_kv, Tk, D). `lsh`: keys normalized, each query's own key scored low, buckets from
    `rotations` (fresh ones from the RNG when None), as the kernel does. Plain causal `full` attention passes no mask
    (the interface's own causal path). A query that sees nothing (left padding) would give NaN in some kernels: it
    sees every key, then its output and probabilities are zeroed (`eager_attention` zeroes such rows itself, so the
    probabilities it returns stay those its output is made of: on the loss's graph, for `retain_grad`).
    """
    t_q, t_k = q.shape[-2], k.shape[-2]
    extra = {}
    if kind == "lsh":
        k = F.normalize(_upcast(k), dim=-1, eps=1e-6).to(k.dtype)
        buckets = lsh_buckets(k, config.lsh_num_hashes, config.lsh_num_buckets, rotations)
        allowed = dense_allowed("lsh", t_q, t_k, key_padding_mask, document_ids, config, buckets)
        extra["self_score"] = LSH_SELF_MASK_VALUE
    elif kind == "full" and key_padding_mask is None and document_ids is None and t_q == t_k:
        allowed = None
    else:
        allowed = dense_allowed(kind, t_q, t_k, key_padding_mask, document_ids, config)
    row_ok = None
    if allowed is not None and key_padding_mask is not None and interface is not eager_attention:
        row_ok = allowed.any(-1, keepdim=True)
        allowed = allowed | ~row_ok
    out, weights = interface(module, q, k, v, allowed, dropout=dropout_p, scaling=scale, **extra)
    if row_ok is not None:
        out = out * row_ok.squeeze(-1).transpose(1, 2).unsqueeze(-1).to(out.dtype)
        if weights is not None:
            weights = weights * row_ok.to(weights.dtype)
    return out, weights


def linear_attention(
    kind: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None,
    document_ids: Tensor | None,
    dropout_p: float,
    scale: float,
    config: Any,
    rotations: Tensor | None = None,
) -> Tensor:
    """`kind`'s linear-memory kernel (`local` or `lsh`): q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> (B, H, Tq, D).

    Key/value heads are repeated for the query heads they serve; packed documents (`document_ids` (B, T)) are moved
    into rows of their own (`unpack_documents`), so each attends exactly as if it were run alone. `rotations`: fixed
    LSH rotations (eval mode); None draws fresh ones.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    kernel = ATTENTION_FUNCTIONS[kind]
    call = dict(dropout_p=dropout_p, scale=scale, config=config)
    if rotations is not None:
        call["rotations"] = rotations
    if document_ids is None:
        return kernel(q, k, v, key_padding_mask=key_padding_mask, **call)
    batch, heads, t, dim = q.shape
    rows, real, back = unpack_documents(document_ids, key_padding_mask)

    def unpack(x: Tensor) -> Tensor:  # (B, H, T, D) -> (B * n, H, L, D)
        flat = x.transpose(0, 1).reshape(heads, batch * t, dim)
        return flat[:, rows].permute(1, 0, 2, 3)

    out = kernel(unpack(q), unpack(k), unpack(v), key_padding_mask=real, **call)  # (B * n, H, L, D)
    out = out.permute(1, 0, 2, 3).reshape(heads, -1, dim)[:, back]  # (H, B * T, D)
    return out.view(heads, batch, t, dim).transpose(0, 1)


# ------------------------------------------------------------------------------- the linear-memory kernels


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


_FIXED_ROTATIONS: dict[tuple, Tensor | None] = {}  # made once per layer and device, reused by every eval forward


def lsh_rotations(
    head_dim: int, n_hashes: int, n_buckets: int, seed: int, device: torch.device | str = "cpu"
) -> Tensor | None:
    """Fixed LSH rotations (head_dim, n_hashes, n_buckets // 2) from ``seed`` (a CPU generator, so the same on
    every device); None for one bucket. Used in eval mode and generation, where logits must be deterministic."""
    key = (head_dim, n_hashes, n_buckets, seed, str(device))
    if key not in _FIXED_ROTATIONS:
        # A normal tensor even when first made under inference mode, since later forwards may differentiate.
        with torch.inference_mode(False):
            _FIXED_ROTATIONS[key] = _draw_rotations(head_dim, n_hashes, n_buckets, seed, device)
    return _FIXED_ROTATIONS[key]


def _draw_rotations(head_dim: int, n_hashes: int, n_buckets: int, seed: int, device: torch.device | str
                    ) -> Tensor | None:
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


def unpack_documents(document_ids: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Index maps that move each packed document of (B, T) rows into a row of its own (B * n, L), and back, so that a
    kernel attends within each document exactly as if it were run alone.

    Returns `rows` (B * n, L) indices into the flattened (B * T) positions, `real` (B * n, L) bool (a real token of
    the document there) and `back` (B * T,) indices into the flattened (B * n * L) slots.
    """
    batch, t = document_ids.shape
    device = document_ids.device
    starts = F.pad(document_ids[:, 1:] != document_ids[:, :-1], (1, 0), value=True)  # (B, T)
    doc = starts.long().cumsum(-1) - 1  # (B, T): 0-based document index in the row
    n = int(doc.max()) + 1
    pos = torch.arange(t, device=device)
    start_pos = torch.where(starts, pos, 0).cummax(-1).values  # (B, T): where each token's document starts
    offset = pos - start_pos  # (B, T): index inside the document
    length = int(offset.max()) + 1
    slot = (torch.arange(batch, device=device)[:, None] * n + doc) * length + offset  # (B, T)
    back = slot.flatten()
    rows = torch.zeros(batch * n * length, dtype=torch.long, device=device)
    real = torch.zeros(batch * n * length, dtype=torch.bool, device=device)
    flat = torch.arange(batch * t, device=device)
    rows[back] = flat
    real[back] = True if key_padding_mask is None else key_padding_mask.flatten().bool()
    return rows.view(batch * n, length), real.view(batch * n, length), back


# The linear-memory kernels of `local` and `lsh` layers, by kind. `full` layers (and every layer under the `eager`
# implementation) run the dense path: `dense_allowed` + `dense_attention` over transformers' attention interface.
ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {
    "local": local_attention,
    "lsh": lsh_attention,
}
