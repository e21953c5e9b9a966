"""Revformer: a reversible decoder-only Transformer, as a Hugging Face causal language model.

Read top to bottom: sublayers F (attention) and G (feed-forward), the two-stream block, the model, the LM head.

The token embedding feeds both residual streams (x1 = x2 = embedding). With the default `sublayer` coupling each
block updates them by `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)` (F attention, G feed-forward), which the reversible engine
inverts in backward, and after the last block the newest stream is the hidden state, `h = y2` (`stream_merge`: or
the mean `(y1 + y2) / 2`, or a learned per-channel mix). With the
`midpoint` coupling every layer is a whole pre-norm Transformer block `f_l(p) = A(p) + M(p + A(p))` and the layers
alternate between the streams, `p[l+1] = p[l-1] + c_l f_l(p[l])`: the engine sees pairs of layers as its F and G,
and the newest stream is the output. The `bdia` coupling pairs whole blocks the same way, joined by
`p[l+1] = gamma p[l-1] + (1 - gamma) p[l] + (1 + gamma) f_l(p[l])` with gamma drawn in training and 0 otherwise.
Either way `h` is normalized and projected to the vocabulary; it stays at `hidden_size`, so the LM head can share
the embedding matrix.

This file, `configuration_revformer.py`, `reversible.py` and `attention.py` go to the Hub with the weights: they
import each other only relatively and need nothing beyond torch and transformers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .attention import ATTENTION_FUNCTIONS, LSH_SELF_MASK_VALUE, lsh_buckets, lsh_rotations
from .configuration_revformer import RevformerConfig
from .reversible import (
    StreamCoupling,
    chunked,
    forward_blocks,
    make_coupling,
    reconstruct_inputs,
    reversible_stack,
    split_output,
)

IGNORE_INDEX = -100

logger = logging.get_logger(__name__)


def _cache_argument(forward):
    """The KV cache argument is `cache`. transformers releases whose generate passes `cache` deprecate the old name
    `past_key_values` (a FutureWarning, as their own models give); earlier v5 releases pass `past_key_values`,
    which the forwards still accept there without a warning (this file runs on any transformers 5 from the Hub)."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES
        from transformers.utils.deprecation import deprecate_kwarg
    except ImportError:
        return forward
    if "cache" not in ALL_CACHE_NAMES:
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


class RevformerRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in fp32; the result comes out in the weight's dtype so that fp32 residual streams feed bf16
        # weights (FSDP mixed precision, a bf16 model) without a dtype mismatch.
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class RevformerStreamMerge(nn.Module):
    """`stream_merge="learned"`: the hidden state `w1 * y1 + w2 * y2` of the top streams, per-channel weights from
    0.5 (the mean)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight1 = nn.Parameter(torch.full((hidden_size,), 0.5))
        self.weight2 = nn.Parameter(torch.full((hidden_size,), 0.5))

    def forward(self, y1: Tensor, y2: Tensor) -> Tensor:
        return self.weight1 * y1 + self.weight2 * y2


class RevformerRotaryEmbedding(nn.Module):
    """Rotary position embedding: cos/sin tables for given positions, per `config.rope_parameters`.

    The frequencies come from transformers' RoPE utilities (`ROPE_INIT_FUNCTIONS`, `dynamic_rope_update`), as in
    Llama: `default`, `linear`, `dynamic`, `yarn`, `llama3`. The buffers are rebuilt on load, never saved.
    """

    def __init__(self, config: RevformerConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_inv_freq(config: RevformerConfig, device: torch.device | None = None) -> tuple[Tensor, float]:
        """Inverse frequencies (head_dim / 2,) and the cos/sin scale (yarn's attention factor; 1 otherwise)."""
        rope_type = config.rope_parameters.get("rope_type")
        if config.rope_parameters.get("rope_theta") is None:
            # e.g. from_pretrained(..., rope_parameters={...}) replaces the saved dict, theta included
            raise ValueError(
                f"rope_parameters={config.rope_parameters} has no rope_theta; include the model's base (the saved "
                f"config's rope_parameters['rope_theta'], 10000.0 by default) next to rope_type."
            )
        if rope_type == "default":
            dim, base = config.head_dim, config.rope_parameters["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
            return inv_freq, 1.0
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"rope_parameters['rope_type']={rope_type!r} is not a RoPE type transformers knows; use one of "
                f"{sorted(['default', *ROPE_INIT_FUNCTIONS])}."
            )
        return ROPE_INIT_FUNCTIONS[rope_type](config, device)

    @torch.no_grad()
    @dynamic_rope_update  # `dynamic` recomputes the frequencies beyond max_position_embeddings
    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B|1, T, D) in fp32 for `position_ids` (B|1, T); `x` gives only the device."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device).float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


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


def _causal_allowed(t_q: int, t_k: int, device: torch.device) -> Tensor:
    """(Tq, Tk) bool: query i (at key index Tk - Tq + i) may see keys j <= its own index."""
    return torch.arange(t_k, device=device)[None, :] <= torch.arange(t_k - t_q, t_k, device=device)[:, None]


def _same_document(document_ids: Tensor | None, t_q: int) -> Tensor | None:
    """(B, 1, Tq, Tk) bool: query and key lie in the same packed document; None without documents."""
    if document_ids is None:
        return None
    return (document_ids[:, -t_q:, None] == document_ids[:, None, :])[:, None]


def dense_allowed(
    kind: str,
    t_q: int,
    t_k: int,
    key_padding_mask: Tensor | None,
    document_ids: Tensor | None,
    config: RevformerConfig,
    buckets: Tensor | None = None,
) -> Tensor:
    """Which keys each query sees under `kind`'s rule, as a dense (B|1, 1|H, Tq, Tk) bool mask.

    The rules of `attention.py`'s kernels, written with (Tq, Tk) matrices for the eager path (which must materialize
    probabilities): causal, padding never seen, and within one packed document (document_ids (B, Tk)). `local`:
    windows of `local_chunk_length` real tokens of the document, the query's chunk and `local_num_chunks_before`
    before it. `lsh` (buckets (B, H, R, Tk)): in some round, a key of the query's bucket among its
    `lsh_chunk_length` most recent earlier same-bucket real tokens, or the query itself.
    """
    device = next((t.device for t in (key_padding_mask, buckets, document_ids) if t is not None), torch.device("cpu"))
    allowed = _causal_allowed(t_q, t_k, device)[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :] & key_padding_mask[:, None, -t_q:, None]
    same_doc = _same_document(document_ids, t_q)
    if same_doc is not None:
        allowed = allowed & same_doc
    if kind == "full":
        return allowed
    # Rank of each token among the real tokens of its document (and, for lsh, of its bucket) before it.
    full_allowed = _causal_allowed(t_k, t_k, device)[None, None]  # (1, 1, Tk, Tk)
    if key_padding_mask is not None:
        full_allowed = full_allowed & key_padding_mask[:, None, None, :]
    if document_ids is not None:
        full_allowed = full_allowed & _same_document(document_ids, t_k)
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
    is_self = torch.arange(t_k, device=device) == torch.arange(t_k - t_q, t_k, device=device)[:, None]
    return seen | (allowed & is_self)  # a query always sees itself (scored low: it wins only when alone)


def revformer_eager_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    self_score: float | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Explicit-score attention, transformers' attention-interface signature: the `eager` implementation.

    query (B, H, Tq, D), key/value (B, H, Tk, D); attention_mask (B|1, 1|H, Tq, Tk) bool (True = may look) or additive
    float, or None for causal attention with the queries at the end of the keys. `self_score` replaces each query's
    score of its own key (the LSH rule). Returns the output (B, Tq, H, D) and the probabilities (B, H, Tq, Tk), zero
    where a query cannot look (and for a query that sees nothing).
    """
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups` queries
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    t_q, t_k = query.shape[-2], key.shape[-2]
    scores = (query * scaling) @ key.transpose(-1, -2)
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if self_score is not None:
        is_self = torch.arange(t_k, device=query.device) == torch.arange(t_k - t_q, t_k, device=query.device)[:, None]
        scores = scores.masked_fill(is_self, self_score)
    if attention_mask is None:
        attention_mask = _causal_allowed(t_q, t_k, query.device)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1) * attention_mask.any(-1, keepdim=True)  # a row that sees nothing gives 0
        probs = probs * attention_mask
    else:
        probs = (scores + attention_mask).softmax(-1)
    probs = F.dropout(probs, p=dropout, training=dropout > 0.0)
    out = (probs.to(value.dtype) @ value).to(query.dtype)
    return out.transpose(1, 2), probs.to(query.dtype)


def _unpack_documents(document_ids: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Index maps that move each packed document of (B, T) rows into a row of its own (B * n, L), and back.

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


class RevformerAttention(nn.Module):
    """F: pre-normalized causal self-attention with the kernel `config.attention_layers[layer_idx]`.

    `full` layers go through transformers' attention interface (`ALL_ATTENTION_FUNCTIONS.get_interface`), as
    Llama's do: `config._attn_implementation` ("sdpa", "eager", or any kernel registered with
    `AttentionInterface.register`) picks the kernel, `set_attn_implementation` switches it on a live model. Their
    mask is None for plain causal attention, else a (B|1, 1, Tq, Tk) bool mask (True = may look) with padding and
    packed-document borders. `local` and `lsh` layers run their linear-memory kernels from `attention.py`; with
    "eager" they run as dense explicit-score attention over the same allowed keys (`dense_allowed`), which is what
    returns their probabilities for `output_attentions`.

    `lsh` layers share one projection for queries and keys, as in the Reformer: hashing groups a query with the
    keys that point the same way, which only makes sense when queries and keys live in the same space. They hash with
    fresh random rotations on every training forward (replayed by the reversible backward through the RNG state) and
    with fixed rotations from `config.lsh_seed` and the layer index in eval mode, so inference is deterministic,
    survives save/load and decodes with a cache exactly.
    """

    def __init__(self, config: RevformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kind = config.attention_layers[layer_idx]
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        # lsh shares the query projection for keys, so its keys have as many heads as its queries.
        self.num_kv_heads = self.num_heads if self.kind == "lsh" else config.num_key_value_heads
        # What transformers' attention functions read from the module (they repeat key/value heads by it).
        self.is_causal = True
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        d, q_width, kv_width = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        in_bias = config.attention_bias or config.qkv_bias
        self.norm = RevformerRMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, q_width, bias=in_bias)
        self.k_proj = None if self.kind == "lsh" else nn.Linear(d, kv_width, bias=in_bias)
        self.v_proj = nn.Linear(d, kv_width, bias=in_bias)
        self.o_proj = nn.Linear(q_width, d, bias=config.attention_bias)
        # Qwen3's per-head RMSNorm of queries and keys, before the rotary embedding.
        self.q_norm = RevformerRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = (
            RevformerRMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm and self.k_proj is not None else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout)
        self._fixed_rotations: tuple[tuple, Tensor | None] | None = None  # eval-mode LSH rotations (not saved)

    def lsh_rotations(self, device: torch.device) -> Tensor | None:
        """The fixed eval-mode rotations of this `lsh` layer, on `device` (None with one bucket)."""
        config = self.config
        # One seed per layer, derived from the config: the same rotations after save/load, on every device.
        seed = config.lsh_seed * 1_000_003 + self.layer_idx
        key = (seed, self.head_dim, config.lsh_num_hashes, config.lsh_num_buckets, str(device))
        if self._fixed_rotations is None or self._fixed_rotations[0] != key:
            rotations = lsh_rotations(self.head_dim, config.lsh_num_hashes, config.lsh_num_buckets, seed, device)
            self._fixed_rotations = (key, rotations)
        return self._fixed_rotations[1]

    def kernel_name(self, output_attentions: bool = False) -> str:
        """The implementation this layer runs: `config._attn_implementation` for `full` layers, the layer's own
        kernel for `local`/`lsh` (dense "eager" under eager); "eager" whenever probabilities are asked for."""
        implementation = "eager" if output_attentions else (self.config._attn_implementation or "sdpa")
        if self.kind == "full" or implementation == "eager":
            return implementation
        return self.kind

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: Cache | None = None,
        attentions: list[Tensor] | None = None,
    ) -> Tensor:
        """x (B, T, d) -> (B, T, d). key_padding_mask (B, T_past + T) bool; document_ids (B, T) (packed documents,
        no cache); `attentions`, when a list, receives this layer's probabilities (B, H, T, T_past + T)."""
        batch, seq, _ = x.shape
        h = self.norm(x)

        def heads(t: Tensor, norm: RevformerRMSNorm | None = None) -> Tensor:  # (B, T, H*D) -> (B, H, T, D)
            t = t.view(batch, seq, -1, self.head_dim).transpose(1, 2)
            return t if norm is None else norm(t)

        q = apply_rotary(heads(self.q_proj(h), self.q_norm), cos, sin)
        k = q if self.k_proj is None else apply_rotary(heads(self.k_proj(h), self.k_norm), cos, sin)
        v = heads(self.v_proj(h))  # (B, H_kv, T, D): the cache keeps grouped key/value heads as they are
        if cache is not None:  # (B, H, T_past + T, D)
            past = int(cache.get_seq_length(self.layer_idx))  # a static cache's count is a tensor updated in place
            k, v = cache.update(k, v, self.layer_idx)
            # A static cache returns all its slots: keep the filled ones, so queries sit at the end of the keys.
            k, v = k[:, :, : past + seq], v[:, :, : past + seq]
        dropout_p = self.config.attention_dropout if self.training else 0.0
        name = self.kernel_name(output_attentions=attentions is not None)
        if self.kind == "full" or name == "eager":
            out, weights = self._through_interface(name, q, k, v, key_padding_mask, document_ids, dropout_p)
            if attentions is not None:
                attentions.append(weights)
        else:
            out = self._own_kernel(q, k, v, key_padding_mask, document_ids, dropout_p).transpose(1, 2)
        out = out.reshape(batch, seq, -1)
        return self.dropout(self.o_proj(out))

    def _through_interface(
        self, name: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
        document_ids: Tensor | None, dropout_p: float,
    ) -> tuple[Tensor, Tensor | None]:
        """`full` layers with any implementation, and every layer under eager: (B, Tq, H, D), probabilities."""
        t_q, t_k = q.shape[-2], k.shape[-2]
        extra = {}
        if self.kind == "lsh":  # dense LSH: normalized keys, own key scored low, the kernel's buckets
            rotations = None if self.training else self.lsh_rotations(q.device)
            k = F.normalize(k.float(), dim=-1, eps=1e-6).to(k.dtype)
            buckets = lsh_buckets(k, self.config.lsh_num_hashes, self.config.lsh_num_buckets, rotations)
            allowed = dense_allowed("lsh", t_q, t_k, key_padding_mask, document_ids, self.config, buckets)
            extra["self_score"] = LSH_SELF_MASK_VALUE
        elif key_padding_mask is None and document_ids is None and t_q == t_k and self.kind == "full":
            allowed = None  # plain causal: the kernel's own is_causal path
        else:
            allowed = dense_allowed(self.kind, t_q, t_k, key_padding_mask, document_ids, self.config)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(name, revformer_eager_attention)
        row_ok = None
        if allowed is not None and key_padding_mask is not None and interface is not revformer_eager_attention:
            # A query that sees nothing (left padding) would give NaN in some kernels: let it see every key, then
            # zero its output and probabilities. (The eager kernel zeroes such rows itself, so the probabilities it
            # returns stay those its output is made of: on the loss's graph, for `retain_grad`.)
            row_ok = allowed.any(-1, keepdim=True)
            allowed = allowed | ~row_ok
        out, weights = interface(self, q, k, v, allowed, dropout=dropout_p, scaling=self.scaling, **extra)
        if row_ok is not None:
            out = out * row_ok.squeeze(-1).transpose(1, 2).unsqueeze(-1).to(out.dtype)
            if weights is not None:
                weights = weights * row_ok.to(weights.dtype)
        return out, weights

    def _own_kernel(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, document_ids: Tensor | None,
        dropout_p: float,
    ) -> Tensor:
        """`local` / `lsh` through their linear-memory kernels: (B, H, Tq, D). Packed documents are moved into
        rows of their own, so each attends exactly as if it were run alone."""
        # lsh: fresh rotations from the RNG in training, the layer's fixed ones in eval mode.
        extra = {"rotations": self.lsh_rotations(q.device)} if self.kind == "lsh" and not self.training else {}
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        kernel = ATTENTION_FUNCTIONS[self.kind]
        call = dict(dropout_p=dropout_p, scale=self.scaling, config=self.config, **extra)
        if document_ids is None:
            return kernel(q, k, v, key_padding_mask=key_padding_mask, **call)
        batch, heads, t, dim = q.shape
        rows, real, back = _unpack_documents(document_ids, key_padding_mask)

        def unpack(x: Tensor) -> Tensor:  # (B, H, T, D) -> (B * n, H, L, D)
            flat = x.transpose(0, 1).reshape(heads, batch * t, dim)
            return flat[:, rows].permute(1, 0, 2, 3)

        out = kernel(unpack(q), unpack(k), unpack(v), key_padding_mask=real, **call)  # (B * n, H, L, D)
        out = out.permute(1, 0, 2, 3).reshape(heads, -1, dim)[:, back]  # (H, B * T, D)
        return out.view(heads, batch, t, dim).transpose(0, 1)


class RevformerFeedForward(nn.Module):
    """G: pre-normalized SwiGLU feed-forward, run `chunk_size` tokens at a time when the sequence is longer.

    G is position-wise, so chunking changes nothing but peak memory: its (T, intermediate_size) activations exist
    for one chunk at a time, in forward and in backward (`chunked`), inside this one call. The reversible engine
    announces the gradient of every re-run, so there the chunks' gradients come with their outputs at no extra cost.
    """

    def __init__(self, config: RevformerConfig) -> None:
        super().__init__()
        d, d_ff = config.hidden_size, config.intermediate_size
        self.chunk_size = config.chunk_size_feed_forward
        self.norm = RevformerRMSNorm(d, config.rms_norm_eps)
        self.gate_proj = nn.Linear(d, d_ff, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d, d_ff, bias=config.mlp_bias)
        self.down_proj = nn.Linear(d_ff, d, bias=config.mlp_bias)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward_chunk(self, x: Tensor, scale: float | Tensor = 1.0) -> Tensor:
        h = self.norm(x)
        out = self.dropout(self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)))
        return out if isinstance(scale, float) and scale == 1.0 else out * scale

    def forward(self, x: Tensor, *aux: Tensor | None, scale: float | Tensor = 1.0) -> Tensor:
        """`scale * G(x)` (`scale`: a number, or per-sequence factors of shape (B, 1, 1)); `aux` (what the engine
        hands every sublayer: rotary tables, masks) is not needed here."""
        plain = isinstance(scale, float) and scale == 1.0
        fn = self.forward_chunk if plain else lambda x: self.forward_chunk(x, scale)
        return chunked(fn, x, self.chunk_size, [p for p in self.parameters() if p.requires_grad])


class RevformerBlock(GradientCheckpointingLayer):
    """One reversible block: `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`; `f` and `g` are what the engine re-runs.

    A `GradientCheckpointingLayer`: `activation_checkpointing_enable()` checkpoints `forward`, the plain path. The
    reversible engine calls `f` and `g` directly and never goes through it.
    """

    def __init__(self, config: RevformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = RevformerAttention(config, layer_idx)
        self.feed_forward = RevformerFeedForward(config)

    @property
    def f(self) -> RevformerAttention:
        return self.attention

    @property
    def g(self) -> RevformerFeedForward:
        return self.feed_forward

    def forward(
        self,
        x1: Tensor,
        x2: Tensor,
        cos: Tensor,
        sin: Tensor,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        *,
        cache: Cache | None = None,
        coupling: StreamCoupling | None = None,
        attentions: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The plain (non-reversible) path, with standard autograd.

        Tensors are positional and the cache a keyword, as `GradientCheckpointingLayer` needs: reentrant
        checkpointing only propagates gradients through positional inputs, and it drops a keyword `cache`.
        """
        coupling = coupling or StreamCoupling()
        f_out = self.f(coupling.read(x2), cos, sin, key_padding_mask, document_ids, cache, attentions)
        y1 = coupling.add(x1, f_out)  # y1 = x1 + F(x2)
        y2 = coupling.add(x2, self.g(coupling.read(y1)))  # y2 = x2 + G(y1)
        return y1, y2


class RevformerMidpointLayer(nn.Module):
    """One whole pre-norm Transformer block as a sublayer of the `midpoint` coupling: `c * f(p)` with
    `f(p) = A(p) + M(p + A(p))`, so that `p + f(p)` is Llama's `h = p + A(p); out = h + M(h)` exactly.

    `c` is 1 for the first layer (its output then equals a standard block's) and `config.midpoint_step` after it.
    The scaled feed-forward output is a term of the sum, so the gradient the engine announces for this layer's output
    is exactly the one that reaches it, and its chunks compute their gradients during the re-run (`chunked`).
    """

    def __init__(self, config: RevformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = RevformerAttention(config, layer_idx)
        self.feed_forward = RevformerFeedForward(config)
        self.step = 1.0 if layer_idx == 0 else float(config.midpoint_step)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: Cache | None = None,
        attentions: list[Tensor] | None = None,
    ) -> Tensor:
        a = self.attention(x, cos, sin, key_padding_mask, document_ids, cache, attentions)
        return self.feed_forward(x + a, scale=self.step) + (a if self.step == 1.0 else a * self.step)


class RevformerBDIALayer(RevformerMidpointLayer):
    """One whole pre-norm Transformer block of the `bdia` coupling: returns `(out, gamma)` with
    `out = (1 - gamma) p + (1 + gamma) f(p)`, which the engine joins as `p[l+1] = gamma * p[l-1] + out`.

    gamma is drawn here, +-`bdia_gamma` per sequence, in training, and the engine replays the RNG when it re-runs the
    layer, so the re-run draws the same gamma; out of training gamma = 0 and `p[l+1] = p + f(p)` is Llama's block.
    The first layer is a standard block, `p[1] = p[-1] + f(p[0])` with `p[-1] = p[0]`, as with `midpoint`.
    """

    def __init__(self, config: RevformerConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.step = 1.0
        self.gamma = float(config.bdia_gamma) if layer_idx > 0 else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: Cache | None = None,
        attentions: list[Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if self.gamma is None:
            return super().forward(x, cos, sin, key_padding_mask, document_ids, cache, attentions)
        a = self.attention(x, cos, sin, key_padding_mask, document_ids, cache, attentions)
        if self.training:
            signs = torch.randint(0, 2, (x.shape[0], 1, 1), device=x.device).mul_(2).sub_(1)
            gamma = signs.to(torch.float32) * self.gamma
        else:
            gamma = x.new_zeros(x.shape[0], 1, 1, dtype=torch.float32)
        step = (1.0 + gamma).to(x.dtype)
        return (1.0 - gamma).to(x.dtype) * x + step * a + self.feed_forward(x + a, scale=step), gamma


class _NoUpdate(nn.Module):
    """The missing partner of the last layer when a `midpoint` stack has an odd number of layers: adds nothing."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return x * 0.0  # on the graph of x, so the engine can differentiate through it


class LayerPair(NamedTuple):
    """Two consecutive `midpoint` layers, as the engine's F and G: `p[l+1] = p[l-1] + F(p[l])`, then G."""

    f: nn.Module
    g: nn.Module


class RevformerPreTrainedModel(PreTrainedModel):
    config_class = RevformerConfig
    config: RevformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # `activation_checkpointing_enable()` checkpoints each block of the plain path (`reversible=False`, and the
    # non-reversible forwards that return hidden states or attentions); the reversible path already recomputes
    # every block in backward, so there the flag is set (Trainer, TRL and PEFT read it) and nothing else changes.
    supports_gradient_checkpointing = True
    # The sublayers, not the block: the reversible engine calls `block.f` and `block.g` directly, so they are the
    # units that FSDP must gather (and device maps must keep whole).
    _no_split_modules = ["RevformerAttention", "RevformerFeedForward"]
    _supports_sdpa = True
    # Padding-free batches: position_ids restarting inside a row mark packed documents, which never see each other.
    _supports_attention_backend = True

    def _activation_checkpointing_enable(self, *args, **kwargs) -> None:
        if self.config.reversible:
            logger.info(
                "Activation checkpointing adds nothing to a reversible revformer: its backward already rebuilds "
                "every block's input instead of storing it, so activation memory does not grow with depth. "
                "is_activation_checkpointing reports True; training steps run reversibly as before."
            )
        super()._activation_checkpointing_enable(*args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RevformerRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RevformerStreamMerge):
            init.constant_(module.weight1, 0.5)
            init.constant_(module.weight2, 0.5)
        elif isinstance(module, RevformerRotaryEmbedding):
            inv_freq, _ = module.compute_inv_freq(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


class RevformerModel(RevformerPreTrainedModel):
    """The embedding, the stack of reversible blocks and the final norm; returns the merged hidden state."""

    def __init__(self, config: RevformerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layer = {"sublayer": RevformerBlock, "midpoint": RevformerMidpointLayer, "bdia": RevformerBDIALayer}
        self.layers = nn.ModuleList(layer[config.coupling](config, i) for i in range(config.num_hidden_layers))
        self.no_update = _NoUpdate()
        learned = config.coupling == "sublayer" and config.stream_merge == "learned"
        self.stream_merge = RevformerStreamMerge(config.hidden_size) if learned else None
        self.norm = RevformerRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RevformerRotaryEmbedding(config)
        self.coupling = make_coupling(config.stream_dtype, config.stream_fraction_bits, config.bdia_keep_bits)
        if config.coupling == "bdia" and config.reversible and config.stream_dtype != "fixed_point":
            logger.warning_once(
                "coupling='bdia' with float32 streams: reversible backward divides each stream by bdia_gamma per "
                "layer, so the rebuilt inputs' rounding error grows by 1/bdia_gamma per layer. Set "
                "stream_dtype='fixed_point' to make it exact."
            )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def reversible_units(self) -> list[RevformerBlock] | list[LayerPair]:
        """What the reversible engine runs, each with sublayers `.f` and `.g`: the blocks (`sublayer` coupling), or
        pairs of consecutive layers (`midpoint`, `bdia`; an odd last layer is paired with `_NoUpdate`)."""
        if self.config.coupling == "sublayer":
            return list(self.layers)
        layers = [*self.layers, self.no_update] if len(self.layers) % 2 else list(self.layers)
        return [LayerPair(layers[i], layers[i + 1]) for i in range(0, len(layers), 2)]

    def input_streams(self, embeds: Tensor) -> tuple[Tensor, Tensor]:
        """The first layer's two streams from the token embedding: both are the embedding."""
        x = self.coupling.encode(embeds)
        return x, x

    def output_stream(self, x1: Tensor, x2: Tensor) -> Tensor:
        """The stack's hidden state from the top streams: as `config.stream_merge` says (`sublayer`), or the newest
        stream (`midpoint`, `bdia`)."""
        decode = self.coupling.decode
        if self.config.coupling != "sublayer":
            return decode(x2 if len(self.layers) % 2 == 0 else x1)
        if self.stream_merge is not None:
            return self.stream_merge(decode(x1), decode(x2))
        if self.config.stream_merge == "newest":
            return decode(x2)
        return (decode(x1) + decode(x2)) / 2

    def uses_randomness(self) -> bool:
        """Whether a forward pass draws random numbers (dropout, LSH rotations) that a re-run must replay."""
        dropout = self.training and (self.config.attention_dropout > 0 or self.config.hidden_dropout > 0)
        bdia = self.training and self.config.coupling == "bdia" and self.config.num_hidden_layers > 1  # gamma draws
        return dropout or bdia or "lsh" in self.config.attention_layers

    @torch.no_grad()
    def reconstruction_error(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> float:
        """max |x - x'| over both streams, x' being the first layer's input rebuilt from the top streams.

        The inverse that reversible backward relies on, run alone: exactly 0.0 with fixed-point streams; with float
        streams it grows with depth and weight size. Call it under the training autocast to measure what training
        sees. Dropout draws are replayed as in backward, and the caller's RNG stream is left untouched. The `bdia`
        coupling is invertible only as trained (gamma != 0): call it in train mode.
        """
        if self.config.coupling == "bdia" and not self.training:
            raise ValueError("A bdia model is invertible only in train mode (gamma = 0 otherwise): call model.train() "
                             "before reconstruction_error().")
        device = input_ids.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            cos, sin = self.rotary_emb(input_ids, torch.arange(input_ids.shape[1], device=device).unsqueeze(0))
            padded = attention_mask is not None and not bool(attention_mask.all())
            aux = (cos, sin, attention_mask.bool() if padded else None)
            x1, x2 = self.input_streams(self.embed_tokens(input_ids))
            units = self.reversible_units()
            y1, y2, contexts = forward_blocks(x1, x2, units, aux, self.coupling, self.uses_randomness())
            r1, r2 = reconstruct_inputs(y1, y2, units, aux, self.coupling, contexts)
        return max((r1.double() - x1.double()).abs().max().item(), (r2.double() - x2.double()).abs().max().item())

    def _warn_past_trained_length(self, length: int, position_ids: Tensor) -> None:
        """Warn once when a position reaches max_position_embeddings. RoPE is defined at every position, so the
        model runs on (as Llama does); only its quality there is unknown. The limit is on positions, not on row
        length: a padding-free batch packs many documents into one row, each restarting at position 0."""
        limit = self.config.max_position_embeddings
        if self.config.rope_parameters["rope_type"] == "dynamic":  # dynamic NTK scaling extends beyond it at run time
            limit = int(limit * self.config.rope_parameters["factor"])
        if length <= limit:  # positions never exceed past + seq: no device sync on ordinary inputs
            return
        largest = int(position_ids.max())
        if largest >= limit:  # one message for every length, so that it is printed once
            logger.warning_once(
                f"Input reaches past the {limit} positions this model was trained for "
                f"(max_position_embeddings={self.config.max_position_embeddings}, rope_parameters="
                f"{self.config.rope_parameters}); running on, but quality there is unmeasured. To extend the "
                f"context, use RoPE scaling, e.g. rope_parameters={{'rope_type': 'yarn', 'factor': 4.0, "
                f"'original_max_position_embeddings': {self.config.max_position_embeddings}, 'rope_theta': "
                f"{self.config.rope_parameters.get('rope_theta')}}} with max_position_embeddings="
                f"{4 * self.config.max_position_embeddings}."
            )

    @staticmethod
    def _padding_from_4d_mask(mask: Tensor, cache: Cache | None) -> Tensor:
        """(B, T_past + T) padding mask from a 4D causal mask (B, 1, Tq, Tk), as generate() builds for a static cache.

        Revformer's kernels take padding, not arbitrary masks: the last query row of a causal mask sees exactly the
        real keys so far, and a static cache's unfilled slots beyond them are dropped.
        """
        last = mask[:, 0, -1, :]
        real = last if last.dtype == torch.bool else last == 0  # additive masks: 0 where allowed
        seen = int(cache.get_seq_length()) if cache is not None else 0
        return real[:, : seen + mask.shape[-2]].long()

    @_cache_argument
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = self._padding_from_4d_mask(attention_mask, cache)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            # A KV cache only when one is passed or asked for (generate does both): an evaluation forward would
            # otherwise build a cache of every layer's keys and values that nobody reads.
            use_cache = cache is not None
        if input_ids is not None:
            check_token_ids(input_ids, self.config.vocab_size)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        batch, seq = inputs_embeds.shape[:2]
        if seq == 0:
            raise ValueError(f"Empty input: {'input_ids' if input_ids is not None else 'inputs_embeds'} has shape "
                             f"{tuple((input_ids if input_ids is not None else inputs_embeds).shape)}, no tokens to "
                             "run; pass at least one token per row (check the tokenizer's output for an empty text).")
        past = int(cache.get_seq_length()) if cache is not None else 0  # a copy: static caches count in place
        document_ids = None  # (B, T): packed documents, from position_ids that restart (padding-free batches)
        unpadded = attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all()))
        if position_ids is not None and past == 0 and cache is None and unpadded:
            document_ids = find_packed_sequence_indices(position_ids.expand(batch, -1))
        if position_ids is None and attention_mask is not None and attention_mask.shape == (batch, past + seq):
            # Count positions over real tokens, as generate() does: a left-padded row then gets its unpadded
            # positions (which `lsh` hashing depends on, not just relative offsets).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=inputs_embeds.device).unsqueeze(0)
        self._warn_past_trained_length(past + seq, position_ids)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)  # (B|1, T, D)
        key_padding_mask = None  # (B, T_past + T) bool, True = real token; None when nothing is padded
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            key_padding_mask = attention_mask.bool()

        # Streams stay fp32 (or fixed point) whatever F and G compute in.
        x1, x2 = self.input_streams(inputs_embeds)
        decode = self.coupling.decode
        hidden_states: list[Tensor] = [decode(x1)] if output_hidden_states else []
        attentions: list[Tensor] | None = [] if output_attentions else None
        reversible = (
            self.config.reversible and torch.is_grad_enabled() and cache is None
            and not output_hidden_states and not output_attentions
            and (self.training or self.config.coupling != "bdia")  # gamma = 0 out of training: not invertible
        )  # fmt: skip
        if reversible:
            aux = (cos, sin, key_padding_mask) if document_ids is None else (cos, sin, key_padding_mask, document_ids)
            x1, x2 = reversible_stack(x1, x2, self.reversible_units(), aux, self.coupling, self.uses_randomness())
        elif self.config.coupling in ("midpoint", "bdia"):
            read, join = self.coupling.read, self.coupling.join
            for layer, unit in enumerate(self.reversible_units()):
                args = (cos, sin, key_padding_mask, document_ids, cache, attentions)
                x1 = join(x1, *split_output(unit.f(read(x2), *args)), invertible=False)[0]
                x2 = join(x2, *split_output(unit.g(read(x1), *args)), invertible=False)[0]
                if output_hidden_states:  # the newest stream after each layer
                    hidden_states.append(decode(x1))
                    if 2 * layer + 1 < len(self.layers):
                        hidden_states.append(decode(x2))
        else:
            for block in self.layers:  # each block checkpoints itself when enabled (GradientCheckpointingLayer)
                x1, x2 = block(
                    x1, x2, cos, sin, key_padding_mask, document_ids,
                    cache=cache, coupling=self.coupling, attentions=attentions,
                )  # fmt: skip
                if output_hidden_states:
                    hidden_states.append(self.output_stream(x1, x2))

        hidden = self.norm(self.output_stream(x1, x2))
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            cache=cache if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


def check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    """A clear error for a token id outside the vocabulary (torch's is `index out of range in self`, or a device-side
    assert on CUDA that ends the process)."""
    if input_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"Token id {bad} is outside this model's vocabulary (ids 0..{vocab_size - 1}, vocab_size={vocab_size}). "
            "The tokenizer probably does not belong to this model: load the one saved with it, or resize the "
            "embeddings with model.resize_token_embeddings(len(tokenizer)) after adding tokens."
        )


def _head_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the LM head computes in: autocast's where it is on, else the weight's."""
    device_type = weight.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype


class Teacher(NamedTuple):
    """What distillation needs of a teacher for the positions of one batch: its final hidden states (N, d_t), its
    LM-head weight (V, d_t) and the weight of the cross-entropy beside the KL term."""

    hidden: Tensor
    weight: Tensor
    ce_weight: float = 0.0

    def piece(self, piece: slice, dtype: torch.dtype) -> Teacher:
        return Teacher(self.hidden[piece].to(dtype), self.weight, self.ce_weight)


def _chunk_loss(hidden: Tensor, weight: Tensor, targets: Tensor, teacher: Teacher | None = None) -> Tensor:
    """Summed loss of one chunk; logits in the head dtype, softmax in fp32.

    Cross-entropy against `targets`, or with a `teacher`, KL(teacher || model) over the positions with a target
    plus `teacher.ce_weight` times the cross-entropy.
    """
    logits = F.linear(hidden, weight).float()
    if teacher is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    keep = targets != IGNORE_INDEX
    with torch.no_grad():
        teacher_log_probs = F.linear(teacher.hidden, teacher.weight).float().log_softmax(-1)[keep]
    log_probs = logits[keep].log_softmax(-1)
    loss = (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum()
    if teacher.ce_weight:
        loss = loss + teacher.ce_weight * F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return loss


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Summed loss (`_chunk_loss`) of `hidden @ weight.T` against `targets`, `chunk_size` positions at a time.

    Full-sequence logits never exist (the teacher's neither, when distilling): each chunk's logits give its loss and,
    at once, its gradients with respect to the hidden states and the head weight, so backward only scales the stored
    gradients (no second LM-head pass). The weights are cast to the compute dtype once for all chunks (autocast would
    keep one cast per chunk alive).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, teacher: Teacher | None = None
    ) -> Tensor:
        # hidden: (N, d), weight: (V, d), targets: (N,)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = _head_dtype(weight)
        w = weight.detach().to(dtype).requires_grad_(want_weight)
        if teacher is not None:
            teacher = teacher._replace(weight=teacher.weight.detach().to(dtype))
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        with torch.autocast(weight.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                piece = slice(start, start + chunk_size)
                with torch.enable_grad():
                    h = hidden[piece].detach().to(dtype).requires_grad_(want_hidden)
                    loss = _chunk_loss(h, w, targets[piece], teacher and teacher.piece(piece, dtype))
                grads = iter(torch.autograd.grad(loss, [t for t in (h, w) if t.requires_grad]))
                if want_hidden:
                    grad_hidden[piece] = next(grads)
                if want_weight:
                    grad_weight += next(grads)
                total += loss.detach()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def causal_lm_loss(
    hidden: Tensor,
    lm_head: nn.Linear,
    labels: Tensor | None,
    chunk_size: int = 0,
    num_items_in_batch: int | Tensor | None = None,
    logits: Tensor | None = None,
    teacher: Teacher | None = None,
    shift_labels: Tensor | None = None,
) -> Tensor:
    """Mean next-token loss: position t predicts `labels[t + 1]`, or `shift_labels[t]` when given (already shifted,
    as context-parallel training passes them per shard); `-100` labels are ignored.

    Cross-entropy, or with a `teacher` (hidden states (B, T, d_t) and head weight) the distillation loss
    KL(teacher || model) + `teacher.ce_weight` * cross-entropy at the same positions. With `chunk_size` > 0 the LM
    heads run in chunks of that many positions and full logits never exist; otherwise pass the `logits` already
    computed for the output (the head then runs once). `num_items_in_batch` (from Trainer / gradient accumulation)
    replaces the local count of predicted tokens as the denominator, so accumulated micro-batches average over the
    whole batch.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # shift left
    targets = shift_labels.reshape(-1)  # (B*T,)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if teacher is not None:
        teacher = teacher._replace(hidden=teacher.hidden.reshape(-1, teacher.hidden.shape[-1]))
    if logits is not None and teacher is None:
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
    elif torch.is_grad_enabled() and (hidden.requires_grad or lm_head.weight.requires_grad):
        total = ChunkedLMHeadLoss.apply(hidden, lm_head.weight, targets, chunk_size or hidden.shape[0], teacher)
    else:  # evaluation: the loss alone, chunk by chunk
        weight = lm_head.weight.to(_head_dtype(lm_head.weight))
        if teacher is not None:
            teacher = teacher._replace(weight=teacher.weight.to(weight.dtype))
        with torch.autocast(weight.device.type, enabled=False):
            total = sum(
                _chunk_loss(hidden[piece].to(weight.dtype), weight, targets[piece],
                            teacher and teacher.piece(piece, weight.dtype))
                for piece in (slice(start, start + (chunk_size or hidden.shape[0]))
                              for start in range(0, hidden.shape[0], chunk_size or hidden.shape[0]))
            )  # fmt: skip
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    if isinstance(count, Tensor):
        count = count.to(total.device)
    return total / count


def teacher_for(hidden: Tensor, teacher_hidden_states: Tensor | None, teacher_lm_head: Tensor | None,
                distill_ce_weight: float, vocab_size: int) -> Teacher | None:
    """The distillation target of a forward call, checked against the student's hidden states (B, T, d)."""
    if teacher_hidden_states is None and teacher_lm_head is None:
        return None
    if teacher_hidden_states is None or teacher_lm_head is None:
        raise ValueError("Distillation needs both teacher_hidden_states (B, T, d_teacher) and teacher_lm_head "
                         "(vocab_size, d_teacher), the teacher's final hidden states and LM-head weight.")
    if teacher_hidden_states.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"teacher_hidden_states has shape {tuple(teacher_hidden_states.shape)} but the inputs have "
                         f"(batch, length) = {tuple(hidden.shape[:2])}; run the teacher on the same input_ids.")
    if teacher_lm_head.shape != (vocab_size, teacher_hidden_states.shape[-1]):
        raise ValueError(f"teacher_lm_head has shape {tuple(teacher_lm_head.shape)}, expected (vocab_size, "
                         f"d_teacher) = ({vocab_size}, {teacher_hidden_states.shape[-1]}): teacher and student must "
                         f"share the vocabulary.")
    return Teacher(teacher_hidden_states.detach(), teacher_lm_head.detach(), distill_ce_weight)


class RevformerForCausalLM(RevformerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RevformerConfig) -> None:
        super().__init__(config)
        self.model = RevformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @_cache_argument
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: Cache | None = None,
        num_items_in_batch: int | Tensor | None = None,
        output_attentions: bool | None = None,
        teacher_hidden_states: Tensor | None = None,
        teacher_lm_head: Tensor | None = None,
        distill_ce_weight: float = 0.0,
        shift_labels: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Next-token logits and, given `labels` (the input ids, shifted inside) or `shift_labels` (already shifted:
        position t predicts shift_labels[t]), the mean cross-entropy.

        Distillation: given also a teacher's final hidden states (B, T, d_teacher) for the same inputs and its LM-head
        weight (vocab_size, d_teacher), the loss is KL(teacher || model) per predicted token, plus
        `distill_ce_weight` times the cross-entropy; the teacher's logits are computed chunk by chunk as well.

        Given labels for more than `config.loss_chunk_size` positions (batch x length), the LM head and the loss run
        in chunks of that many positions and `logits` is None: full-sequence logits are what chunking exists to
        avoid. Otherwise the LM head runs once and its logits give the loss.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state  # (B, T, d)
        chunk = self.config.loss_chunk_size
        loss = logits = None
        if labels is None and shift_labels is not None:
            labels = shift_labels  # only its shape and presence matter from here
        chunked_loss = labels is not None and 0 < chunk < hidden.shape[1] * hidden.shape[0]
        if not chunked_loss:
            # logits_to_keep=k keeps the last k positions (generation needs only the last one); 0 keeps all.
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
        if labels is not None:
            full = logits if logits is not None and logits.shape[1] == hidden.shape[1] else None
            teacher = teacher_for(hidden, teacher_hidden_states, teacher_lm_head, distill_ce_weight,
                                  self.config.vocab_size)
            loss = causal_lm_loss(hidden, self.lm_head, labels, chunk, num_items_in_batch, logits=full, teacher=teacher,
                                  shift_labels=shift_labels)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["RevformerPreTrainedModel", "RevformerModel", "RevformerForCausalLM"]
