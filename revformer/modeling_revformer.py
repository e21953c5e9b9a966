"""Revformer: a reversible decoder-only Transformer, as a Hugging Face causal language model.

Read top to bottom: the sublayers (attention and feed-forward), the layers of each coupling topology, the topologies
themselves, the model and the LM head. The rooms beside this file: `attention.py` (masking rules, the dense path and
the linear-memory kernels), `reversible.py` (the engine and the stream arithmetic), `loss.py` (the chunked LM-head
loss and distillation), `configuration_revformer.py`. They go to the Hub with the weights: they import each other
only relatively and need nothing beyond torch and transformers.

The token embedding feeds both residual streams. The coupling topology (`config.coupling`) decides how layers update
them: `sublayer` blocks `y1 = x1 + A(x2)`, `y2 = x2 + M(y1)`, or `bdia` whole blocks alternating between the
streams. Either way the newest stream is the hidden state, normalized and projected to the vocabulary; it stays at
`hidden_size`, so the LM head can share the embedding matrix.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .attention import (
    apply_rotary,
    attention_inputs,
    dense_attention,
    eager_attention,
    linear_attention,
    lsh_rotations,
)
from .configuration_revformer import RevformerConfig
from .loss import Teacher, causal_lm_loss
from .reversible import (
    ForwardContext,
    StreamArithmetic,
    UpstreamGradient,
    chunk_slices,
    chunked,
    forward_blocks,
    reconstruct_inputs,
    reversible_stack,
    split_output,
    stream_arithmetic,
    take_upstream_gradient,
)

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


class RevformerAttention(nn.Module):
    """Pre-normalized causal self-attention with the kind `config.attention_layers[layer_idx]`.

    `full` layers run the dense path over transformers' attention interface, as Llama's do:
    `config._attn_implementation` ("sdpa", "eager", or any registered kernel) picks the kernel and
    `set_attn_implementation` switches it on a live model. `local` and `lsh` layers run their linear-memory kernels,
    and the dense path under "eager" (which returns probabilities for `output_attentions`); `attention.py` holds both.

    `lsh` layers share one projection for queries and keys, as in the Reformer: hashing groups a query with the keys
    that point the same way. They hash with fresh random rotations on every training forward (replayed by the
    reversible backward through the RNG state) and with fixed rotations from `config.lsh_seed` and the layer index in
    eval mode, so inference is deterministic, survives save/load and decodes with a cache exactly.

    Long sequences take `config.chunk_size_attention` queries at a time in `full` layers (`chunks_queries`,
    `QueryChunkedAttention`): only keys, values and their gradients are whole-sequence tensors.

    Under sequence parallelism (`sequence_parallel`, set by `revformer.sequence_parallel`) `x` is this rank's slice
    of the sequence: an all-to-all before the kernel gives it the whole sequence for its share of the heads, one after
    gives back its slice with every head.
    """

    sequence_parallel = None  # a `SequenceParallel` while one sequence spans several ranks
    # The `sublayer` coupling's attention is a whole sublayer of the reversible engine: the gradient the engine
    # announces is its output's. Inside a `bdia` layer it is not (that layer sets False).
    is_whole_sublayer = True

    def __init__(self, config: RevformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kind = config.attention_layers[layer_idx]
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        # lsh shares the query projection for keys, so its keys have as many heads as its queries.
        self.num_kv_heads = self.num_heads if self.kind == "lsh" else config.num_key_value_heads
        # What transformers' attention functions read from the module (they repeat key/value heads by
        # `num_key_value_groups`).
        self.is_causal = True
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
        self.chunk_size = config.chunk_size_feed_forward

        # The heads of `project`'s output: queries, keys (none for lsh: they are the queries), values.
        self.head_split = [self.num_heads, *([] if self.k_proj is None else [self.num_kv_heads]), self.num_kv_heads]

    @property
    def num_key_value_groups(self) -> int:
        """Query heads per key/value head. Under sequence parallelism key/value heads that do not divide between the
        P ranks are replicated until they do, each then serving fewer query heads."""
        ranks = 1 if self.sequence_parallel is None else self.sequence_parallel.size
        return self.num_heads // math.lcm(self.num_kv_heads, ranks)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The position-wise part: x (B, t, d) -> queries, keys and values side by side (B, t, heads, D), queries and
        keys normalised (qk_norm) and rotated by the angles cos/sin (B|1, t, D)."""
        h = self.norm(x)

        def heads(proj: nn.Linear, norm: RevformerRMSNorm | None = None, rotate: bool = True) -> Tensor:
            t = proj(h).unflatten(-1, (-1, self.head_dim))  # (B, t, H, D)
            t = t if norm is None else norm(t)
            return apply_rotary(t.transpose(1, 2), cos, sin).transpose(1, 2) if rotate else t

        keys = [] if self.k_proj is None else [heads(self.k_proj, self.k_norm)]
        return torch.cat([heads(self.q_proj, self.q_norm), *keys, heads(self.v_proj, rotate=False)], dim=2)

    def project_params(self) -> list[nn.Parameter]:
        """The trainable parameters `project` runs (those of LoRA adapters wrapping the projections included)."""
        modules = (self.norm, self.q_proj, self.k_proj, self.v_proj, self.q_norm, self.k_norm)
        return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]

    def chunks_queries(self, x: Tensor, cache: Cache | None = None, attentions: list | None = None) -> bool:
        """Whether this call takes `config.chunk_size_attention` queries at a time (`QueryChunkedAttention`): causal
        `full` attention under sdpa or eager, longer than a chunk, without a cache, probabilities, attention dropout
        or sequence parallelism. On CUDA only without grouped key/value heads: torch's fused CUDA kernels take no
        mask with grouped heads (they would fall back to the math kernel), which the CPU's flash kernel does."""
        c = self.config
        return (
            self.kind == "full" and 0 < c.chunk_size_attention < x.shape[1] and cache is None and attentions is None
            and self.sequence_parallel is None and self.kernel_name() in ("sdpa", "eager")
            and not (self.training and c.attention_dropout > 0)
            and (x.device.type == "cpu" or self.num_kv_heads == self.num_heads)
        )

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, key_padding_mask: Tensor | None,
               document_ids: Tensor | None) -> Tensor:
        """One chunk of `QueryChunkedAttention`: the queries q (B, L, H, D) of the last L positions of the keys and
        values (B, t, H_kv, D) -> the layer's output at those positions (B, L, d), before dropout."""
        t = keys.shape[1]
        eager = self.kernel_name() == "eager"
        out, _ = dense_attention(
            eager_attention if eager else _sdpa_grouped, self, q.transpose(1, 2), keys.transpose(1, 2),
            values.transpose(1, 2), kind="full", dropout_p=0.0, scale=self.scaling, config=self.config,
            key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, :t],
            document_ids=None if document_ids is None else document_ids[:, :t],
        )
        return self.o_proj(out.reshape(*q.shape[:2], -1))

    def query_chunked(self, x: Tensor, cos: Tensor, sin: Tensor, key_padding_mask: Tensor | None,
                      document_ids: Tensor | None, tail: BDIATailSpec | None = None) -> Tensor:
        """The attention (and `tail`, if given) a chunk of queries at a time: `QueryChunkedAttention`."""
        project_params = self.project_params()
        output_params = [p for p in self.o_proj.parameters() if p.requires_grad]
        tail_params = [] if tail is None else [p for p in tail.feed_forward.parameters() if p.requires_grad]
        params = [*project_params, *output_params, *tail_params]
        if not (torch.is_grad_enabled() and (x.requires_grad or params)):
            return _attend_in_chunks(self, x, cos, sin, key_padding_mask, document_ids, tail)[0]
        if tail is not None and tail.hint is None:
            raise ValueError("A bdia layer's fused attention and feed-forward need the engine's announced gradient "
                             "to run with grad.")
        counts = (len(project_params), len(output_params))
        return QueryChunkedAttention.apply(self, tail, counts, x, cos, sin, key_padding_mask, document_ids, *params)

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
        tail: BDIATailSpec | None = None,
    ) -> Tensor:
        """x (B, T, d) -> (B, T, d). key_padding_mask (B, T_past + T) bool; document_ids (B, T) (packed documents,
        no cache); `attentions`, when a list, receives this layer's probabilities (B, H, T, T_past + T). `tail`: the
        end of a `bdia` layer, computed with the attention a chunk of queries at a time (`RevformerFeedForward`)."""
        batch, seq, _ = x.shape
        if self.chunks_queries(x, cache, attentions):
            out = self.query_chunked(x, cos, sin, key_padding_mask, document_ids, tail)
            return out if tail is not None else self.dropout(out)
        if tail is not None:
            raise ValueError("A bdia tail rides only on query-chunked attention (see `chunks_queries`).")
        # The position-wise part runs a chunk of tokens at a time, so its normalisation, projection and rotary
        # temporaries exist for one chunk, in backward too (its output is not the sublayer's: it recomputes there).
        qkv = chunked(self.project, x, self.chunk_size, self.project_params(), aligned=(cos, sin), fuse=False)
        split, sp = self.head_split, self.sequence_parallel
        if sp is not None:  # (B, t, H, D), my tokens -> (B, T, H / P, D), my heads
            qkv, split = sp.scatter_heads(qkv, split)
        q, *kv = qkv.transpose(1, 2).split(split, dim=1)  # views (B, H, T, D) of (B, T, H, D)
        k, v = (q, *kv) if self.k_proj is None else kv  # v: (B, H_kv, T, D), grouped heads kept as they are
        if cache is not None:  # (B, H, T_past + T, D)
            past = int(cache.get_seq_length(self.layer_idx))  # a static cache's count is a tensor updated in place
            k, v = cache.update(k.contiguous(), v.contiguous(), self.layer_idx)  # not views pinning the queries
            # A static cache returns all its slots: keep the filled ones, so queries sit at the end of the keys.
            k, v = k[:, :, : past + seq], v[:, :, : past + seq]
        name = self.kernel_name(output_attentions=attentions is not None)
        rotations = None  # lsh: fresh rotations from the RNG in training, the layer's fixed ones in eval mode
        if self.kind == "lsh" and not self.training:
            c = self.config  # one seed per layer, derived from the config: the same rotations after save/load
            seed = c.lsh_seed * 1_000_003 + self.layer_idx
            rotations = lsh_rotations(self.head_dim, c.lsh_num_hashes, c.lsh_num_buckets, seed, q.device)
        call = dict(key_padding_mask=key_padding_mask, document_ids=document_ids, scale=self.scaling,
                    dropout_p=self.config.attention_dropout if self.training else 0.0, config=self.config,
                    rotations=rotations)
        if self.kind == "full" or name == "eager":
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_attention)
            out, weights = dense_attention(interface, self, q, k, v, kind=self.kind, **call)
            if attentions is not None:
                attentions.append(weights)
        else:
            out = linear_attention(self.kind, q, k, v, **call).transpose(1, 2)
        if sp is not None:  # (B, T, H / P, D) -> (B, t, H, D)
            out = sp.gather_heads(out)
        return self.dropout(self.o_proj(out.reshape(batch, seq, -1)))


def _sdpa_grouped(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """torch's sdpa under transformers' attention-interface signature, grouped key/value heads passed as they are
    (`enable_gqa`) under a mask too, where transformers' sdpa repeats them: (B, Tq, H, D), no probabilities. No mask:
    causal attention of square inputs."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         is_causal=attention_mask is None, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None


class BDIATailSpec(NamedTuple):
    """The end of a `bdia` layer, `keep * x + step * a + step * G(x + a)` (`RevformerFeedForward.bdia_tail`), for
    `QueryChunkedAttention` to compute with the attention a: the feed-forward, the per-sequence factors (None in the
    first layer: `a + G(x + a)`) and the gradient the reversible engine announced for the layer's output (None
    without grad: the engine's forward pass, whose output the re-run reproduces bit for bit by the same chunks)."""

    feed_forward: RevformerFeedForward
    keep: Tensor | None
    step: Tensor | None
    hint: UpstreamGradient | None


def _key_value_buffers(k: Tensor, v: Tensor, seq: int, gradients: bool = False) -> tuple[Tensor, Tensor]:
    """Whole-sequence (B, T, H_kv, D) buffers shaped like a chunk's keys and values, or zeroed ones for their
    gradients (in fp32 at least: they are summed over chunks)."""
    if not gradients:
        return k.new_empty(k.shape[0], seq, *k.shape[2:]), v.new_empty(v.shape[0], seq, *v.shape[2:])
    dtype = torch.promote_types(k.dtype, torch.float32)
    return torch.zeros_like(k, dtype=dtype), torch.zeros_like(v, dtype=dtype)


def _attend_in_chunks(attention: RevformerAttention, x: Tensor, cos: Tensor, sin: Tensor,
                      key_padding_mask: Tensor | None, document_ids: Tensor | None,
                      tail: BDIATailSpec | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The attention's output (B, T, d) before dropout (with `tail`: the bdia layer's), one chunk of queries at a
    time against the keys before them, and the keys and values (B, T, H_kv, D), which the chunks fill in order
    (causal: a chunk needs no later key)."""
    batch, seq, _ = x.shape
    keys = values = out = None
    for p in chunk_slices(seq, attention.config.chunk_size_attention):
        q, k, v = attention.project(x[:, p], cos[:, p], sin[:, p]).split(attention.head_split, dim=2)
        if keys is None:
            keys, values = _key_value_buffers(k, v, seq)
        keys[:, p], values[:, p] = k, v
        y = attention.attend(q, keys[:, : p.stop], values[:, : p.stop], key_padding_mask, document_ids)
        if tail is not None:
            y = tail.feed_forward.tail_chunk(x[:, p], y, tail.keep, tail.step)
        if out is None:  # a bdia layer's sum in the streams' dtype at least, as `_tail_output` gives
            out = y.new_empty(batch, seq, y.shape[-1], dtype=y.dtype if tail is None else _sum_dtype(x, y))
        out[:, p] = y
        del q, k, v, y
    return out, keys, values


def _keys_and_values(attention: RevformerAttention, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The keys and values (B, T, H_kv, D) of `_attend_in_chunks`, computed by the same chunks."""
    seq = x.shape[1]
    keys = values = None
    for p in chunk_slices(seq, attention.config.chunk_size_attention):
        _, k, v = attention.project(x[:, p], cos[:, p], sin[:, p]).split(attention.head_split, dim=2)
        if keys is None:
            keys, values = _key_value_buffers(k, v, seq)
        keys[:, p], values[:, p] = k, v
    return keys, values


def _sum_into(sums: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    for i, grad in enumerate(grads):
        if grad is not None:
            sums[i] = grad if sums[i] is None else sums[i].add_(grad)


def _attention_chunks_with_gradients(
    attention: RevformerAttention, x: Tensor, cos: Tensor, sin: Tensor, masks: tuple[Tensor | None, Tensor | None],
    keys: Tensor, values: Tensor, project_params: Sequence[Tensor], output_params: Sequence[Tensor],
    chunk_grad: Callable[[slice, Tensor], Tensor], x_grad: Tensor,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """The gradients of `_attend_in_chunks`, one chunk of queries at a time, last chunk first: the keys of a chunk
    have then had the gradients of every query that sees them, and go back through the projections with the
    chunk's queries. `chunk_grad(p, y)`: the gradient of the output at positions p, given the attention's output
    there (y, no graph). x's gradient is added into `x_grad`; returns the projection and output parameters'."""
    keys_grad, values_grad = _key_value_buffers(keys, values, keys.shape[1], gradients=True)
    project_grads: list[Tensor | None] = [None] * len(project_params)
    output_grads: list[Tensor | None] = [None] * len(output_params)
    for p in reversed(chunk_slices(x.shape[1], attention.config.chunk_size_attention)):
        with torch.enable_grad():
            x_piece = x[:, p].detach().requires_grad_()
            qkv = attention.project(x_piece, cos[:, p], sin[:, p])
            q = qkv[:, :, : attention.num_heads].detach().requires_grad_()
            k, v = (t[:, : p.stop].detach().requires_grad_() for t in (keys, values))
            y = attention.attend(q, k, v, *masks)
        y_grad = chunk_grad(p, y.detach()).to(y.dtype)
        found = torch.autograd.grad(y, [q, k, v, *output_params], y_grad, allow_unused=True)
        del y, y_grad
        keys_grad[:, : p.stop] += found[1]
        values_grad[:, : p.stop] += found[2]
        _sum_into(output_grads, found[3:])
        qkv_grad = torch.cat([found[0], keys_grad[:, p].to(q.dtype), values_grad[:, p].to(q.dtype)], dim=2)
        del found
        got = torch.autograd.grad(qkv, [x_piece, *project_params], qkv_grad, allow_unused=True)
        x_grad[:, p] += got[0]
        _sum_into(project_grads, got[1:])
        del qkv, qkv_grad, got
    return project_grads, output_grads


class QueryChunkedAttention(torch.autograd.Function):
    """Causal attention a chunk of `chunk_size_attention` queries at a time: a long sequence's queries, attention
    outputs and their gradients exist for one chunk; what is whole is the keys and values, their gradients and x's
    gradient.

    Two ways to the gradients, as `ChunkedFunction` has:
    - with the gradient of the output announced (the reversible engine's re-run of the `sublayer` coupling's
      attention, or of a `bdia` layer), the forward computes the keys and values, then each chunk's output with its
      gradients, last chunk first, and backward returns them: no recompute;
    - otherwise backward recomputes each chunk (one more attention forward).

    With a `tail` (a `bdia` layer), the output is the layer's: each chunk's feed-forward end comes with the chunk's
    attention output, and the attention output's gradient is made a chunk at a time from the feed-forward's.

    Call as `QueryChunkedAttention.apply(attention, tail, (n_project, n_output), x, cos, sin, key_padding_mask,
    document_ids, *project_params, *output_params, *tail_params)`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, attention: RevformerAttention, tail: BDIATailSpec | None, counts: tuple[int, int], x: Tensor,
        cos: Tensor, sin: Tensor, key_padding_mask: Tensor | None, document_ids: Tensor | None, *params: Tensor,
    ) -> Tensor:
        ctx.attention, ctx.counts, ctx.masks = attention, counts, (key_padding_mask, document_ids)
        ctx.replay_ctx = ForwardContext(x.device, capture_rng=False)  # its autocast state, for a recompute
        hint = tail.hint if tail is not None else (
            take_upstream_gradient(x.shape) if attention.is_whole_sublayer else None)
        ctx.announced = ctx.grads = None
        if hint is None:
            out, keys, values = _attend_in_chunks(attention, x, cos, sin, key_padding_mask, document_ids)
        else:
            keys, values = _keys_and_values(attention, x, cos, sin)
            out, ctx.grads = _attention_with_announced_gradient(attention, tail, hint, counts, x, cos, sin, keys,
                                                                values, ctx.masks, params)
            ctx.announced = hint.to(out.dtype)
        ctx.tail = tail is not None
        ctx.save_for_backward(x, cos, sin, keys, values, *params)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, cos, sin, keys, values, *params = ctx.saved_tensors
        if ctx.announced is not None and grad is ctx.announced:
            x_grad, *param_grads = ctx.grads  # computed in forward for exactly this gradient
        elif ctx.tail:
            raise RuntimeError("A bdia layer's fused attention and feed-forward received a gradient other than the "
                               "one the reversible engine announced; its output must be the layer's, unmodified.")
        else:
            n_project, n_output = ctx.counts
            x_grad = torch.zeros_like(x)
            with ctx.replay_ctx.replay():
                param_grads = _attention_chunks_with_gradients(
                    ctx.attention, x, cos, sin, ctx.masks, keys, values, params[:n_project],
                    params[n_project : n_project + n_output], lambda p, y: grad[:, p], x_grad)
        ctx.grads = ctx.announced = None
        flat = [g for group in param_grads for g in group]
        return None, None, None, x_grad, None, None, None, None, *flat


def _attention_with_announced_gradient(
    attention: RevformerAttention, tail: BDIATailSpec | None, hint: UpstreamGradient, counts: tuple[int, int],
    x: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, masks: tuple[Tensor | None, Tensor | None],
    params: Sequence[Tensor],
) -> tuple[Tensor, tuple]:
    """`QueryChunkedAttention`'s output and its gradients for the announced gradient `hint` of it: the output, and
    (x's gradient, the projection, output and tail parameters' gradients)."""
    n_project, n_output = counts
    tail_params = params[n_project + n_output :]
    tail_grads: list[Tensor | None] = [None] * len(tail_params)
    x_grad = torch.zeros_like(x)
    out: Tensor | None = None

    def chunk_grad(p: slice, a: Tensor) -> Tensor:  # writes the output's chunk, returns the attention output's grad
        nonlocal out
        if tail is None:
            if out is None:
                out = a.new_empty(*x.shape[:2], a.shape[-1])
            out[:, p] = a
            return hint.to(a.dtype)[:, p]
        keep, step = tail.keep, tail.step
        piece, h_grad, grads = _tail_chunk_with_gradients(tail.feed_forward, hint, p, x[:, p], a, keep, step,
                                                          tail_params)
        _sum_into(tail_grads, grads)
        if out is None:
            out = piece.new_empty(*x.shape[:2], piece.shape[-1], dtype=_sum_dtype(x, piece))
        out[:, p] = piece
        a_grad, x_grad[:, p] = _bdia_sum_gradients(h_grad, hint.to(out.dtype)[:, p], keep, step)
        return a_grad

    project_grads, output_grads = _attention_chunks_with_gradients(
        attention, x, cos, sin, masks, keys, values, params[:n_project], params[n_project : n_project + n_output],
        chunk_grad, x_grad)
    return out, (x_grad, project_grads, output_grads, tail_grads)


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

    def forward(self, x: Tensor, *aux: Tensor | None, scale: float | Tensor = 1.0, into: Tensor | None = None,
                attention_output: Tensor | None = None, keep: Tensor | None = None,
                fused_attention: tuple[RevformerAttention, tuple, UpstreamGradient] | None = None) -> Tensor:
        """`scale * G(x)` (`scale`: a number, or per-sequence factors of shape (B, 1, 1)), plus `into` if given (a long
        sequence's chunks are then added to it in place: no separate output buffer); `aux` (what the engine hands
        every sublayer: rotary tables, masks) is not needed here. With `attention_output` a, the end of a `bdia`
        layer instead: `keep * x + scale * a + scale * G(x + a)`, or `a + G(x + a)` (`bdia_tail`). A call, not a
        method of its own, so that what wraps the module's call (FSDP2 gathering its parameters) wraps this too.
        `fused_attention` (attention, its arguments, the announced gradient): that end with the attention's output
        computed inside, query-chunked (a `bdia` layer's reversible re-run, `QueryChunkedAttention`)."""
        plain = isinstance(scale, float) and scale == 1.0
        if fused_attention is not None:
            attention, args, hint = fused_attention
            return attention(x, *args, tail=BDIATailSpec(self, keep, None if plain else scale, hint))
        if attention_output is not None:
            return self.bdia_tail(x, attention_output, keep, None if plain else scale)
        fn = self.forward_chunk if plain else lambda x: self.forward_chunk(x, scale)
        return chunked(fn, x, self.chunk_size, [p for p in self.parameters() if p.requires_grad], into=into)

    def tail_chunk(self, x: Tensor, a: Tensor, keep: Tensor | None, step: Tensor | None) -> Tensor:
        """`keep * x + step * a + step * G(x + a)` at some positions (`keep`, `step` None: `a + G(x + a)`, the first
        layer's), what a `bdia` layer adds to the stream."""
        return _bdia_sum(x, a, self.forward_chunk(x + a, 1.0 if step is None else step), keep, step)

    def bdia_tail(self, x: Tensor, a: Tensor, keep: Tensor | None = None, step: Tensor | None = None) -> Tensor:
        """`keep * x + step * a + step * G(x + a)` (`keep`, `step`: per-sequence factors (B, 1, 1), or None for
        `a + G(x + a)`) over the whole sequence, `chunk_size` positions at a time, written over `a` where its dtype
        allows (the attention output is needed by nothing else): neither `x + a` nor the sum is held whole beside it.
        With grad, the reversible re-run (which announced the output's gradient) gets each chunk's gradients with its
        output (`BDIATail`); the plain path differentiates the two terms and the feed-forward, chunked and recomputed
        in backward. Without grad (the forward pass, whose output the re-run must reproduce bit for bit) the same
        chunks run as in the re-run."""
        params = [p for p in self.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or params):
            hint = take_upstream_gradient(a.shape)
            if hint is not None:
                return BDIATail.apply(self, hint, x, a, keep, step, *params)
            if keep is None:
                return self.forward(x + a, into=a)
            h, rest = BDIATerms.apply(x, a, keep, step)
            return self.forward(h, scale=step, into=rest)
        out = _tail_output(x, a)
        for p in chunk_slices(x.shape[1], self.chunk_size):
            out[:, p] = self.tail_chunk(x[:, p], a[:, p], keep, step)
        return out


def _sum_dtype(x: Tensor, a: Tensor) -> torch.dtype:
    """The dtype of a `bdia` layer's sum of the stream x and the attention output a."""
    return torch.promote_types(x.dtype, a.dtype)


def _tail_output(x: Tensor, a: Tensor) -> Tensor:
    """Where the tail goes: over `a` when it has the result's dtype and owns its memory, else a new tensor."""
    dtype = _sum_dtype(x, a)
    return a if a.dtype == dtype and not a._is_view() else torch.empty_like(a, dtype=dtype)


def _tail_with_gradients(
    feed_forward: RevformerFeedForward, hint: UpstreamGradient, x: Tensor, a: Tensor, keep: Tensor | None,
    step: Tensor | None, params: Sequence[Tensor],
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """`feed_forward.bdia_tail(x, a, keep, step)` a chunk at a time (over `a` where it can), each chunk with its
    gradients for the announced gradient of the output: returns the output, the gradient of x + a (whole sequence)
    and the parameters' gradients."""
    out = _tail_output(x, a)
    h_grad = torch.empty_like(x, dtype=_sum_dtype(x, a))
    param_grads: list[Tensor | None] = [None] * len(params)
    for p in chunk_slices(x.shape[1], feed_forward.chunk_size):
        out[:, p], h_grad[:, p], grads = _tail_chunk_with_gradients(feed_forward, hint, p, x[:, p], a[:, p], keep,
                                                                    step, params)
        _sum_into(param_grads, grads)
    return out, h_grad, param_grads


def _tail_chunk_with_gradients(
    feed_forward: RevformerFeedForward, hint: UpstreamGradient, p: slice, x: Tensor, a: Tensor, keep: Tensor | None,
    step: Tensor | None, params: Sequence[Tensor],
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """`feed_forward.tail_chunk(x, a, keep, step)` at positions p (no graph), with the gradient of x + a there and
    the parameters' for the announced gradient of the output."""
    with torch.enable_grad():  # the same arithmetic as tail_chunk, with the feed-forward's input a leaf
        h = (x + a).detach().requires_grad_()
        g = feed_forward.forward_chunk(h, 1.0 if step is None else step)
    h_grad, *param_grads = torch.autograd.grad(g, [h, *params], hint.to(g.dtype)[:, p], allow_unused=True)
    return _bdia_sum(x, a, g.detach(), keep, step), h_grad, param_grads


def _bdia_sum(x: Tensor, a: Tensor, g: Tensor, keep: Tensor | None, step: Tensor | None) -> Tensor:
    """`keep * x + step * a + g` (g: the feed-forward's output, already scaled by step), or `a + g` (`keep` None)."""
    return a + g if keep is None else torch.addcmul(keep * x, step, a).add_(g)


def _bdia_sum_gradients(h_grad: Tensor, grad: Tensor, keep: Tensor | None, step: Tensor | None
                        ) -> tuple[Tensor, Tensor]:
    """The gradients of a and x in `_bdia_sum` with g = step * G(x + a), from the sum's gradient `grad` and that of
    x + a (`h_grad`), over which x's goes: x is G's input only in the first layer's `a + G(x + a)`."""
    a_grad = h_grad + grad if step is None else torch.addcmul(h_grad, step, grad)
    return a_grad, (h_grad if keep is None else h_grad.addcmul_(keep, grad))


class BDIATail(torch.autograd.Function):
    """`RevformerFeedForward.bdia_tail` in a reversible re-run: each chunk's output and its gradients come together,
    with the announced gradient of the output (`upstream_gradient`), so the backward has nothing to recompute and
    keeps only the gradient of `x + a` (whole-sequence), from which it makes those of x and a.

    Call as `BDIATail.apply(feed_forward, hint, x, a, keep, step, *params)`. Nothing is saved to recompute from: the
    engine back-propagates exactly the gradient it announced, and any other gradient is an error."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, feed_forward: RevformerFeedForward, hint: UpstreamGradient, x: Tensor, a: Tensor,
        keep: Tensor | None, step: Tensor | None, *params: Tensor,
    ) -> Tensor:
        out, h_grad, param_grads = _tail_with_gradients(feed_forward, hint, x, a, keep, step, params)
        if out is a:
            ctx.mark_dirty(a)
        out_grad = hint.to(out.dtype)
        ctx.factors = (keep, step)  # (B, 1, 1) each, or None
        ctx.out_grad, ctx.h_grad, ctx.param_grads = out_grad, h_grad, param_grads
        ctx.dtypes = (x.dtype, a.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if grad is not ctx.out_grad:
            raise RuntimeError("A bdia layer's fused tail received a gradient other than the one the reversible "
                               "engine announced; its output must be the layer's output, unmodified.")
        (keep, step), h_grad, param_grads = ctx.factors, ctx.h_grad, ctx.param_grads
        ctx.out_grad = ctx.h_grad = ctx.param_grads = None
        a_grad, x_grad = _bdia_sum_gradients(h_grad, grad, keep, step)
        return None, None, x_grad.to(ctx.dtypes[0]), a_grad.to(ctx.dtypes[1]), None, None, *param_grads


class RevformerBlock(GradientCheckpointingLayer):
    """A layer of the `sublayer` coupling, one reversible block: `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`, F its
    attention and G its feed-forward, which the engine calls directly. `forward` is the plain path, which
    `activation_checkpointing_enable()` checkpoints (a `GradientCheckpointingLayer`)."""

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
        self, x1: Tensor, x2: Tensor, *aux: Tensor | None, cache: Cache | None = None,
        streams: StreamArithmetic | None = None, attentions: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The plain (non-reversible) path, with standard autograd; `aux`: (cos, sin, key_padding_mask, document_ids).

        Tensors are positional and the cache a keyword, as `GradientCheckpointingLayer` needs: reentrant
        checkpointing only propagates gradients through positional inputs, and it drops a keyword `cache`.
        """
        streams = streams or StreamArithmetic()
        y1 = streams.add(x1, self.f(streams.read(x2), *aux, cache, attentions))
        y2 = streams.add(x2, self.g(streams.read(y1)))
        return y1, y2


class BDIATerms(torch.autograd.Function):
    """`h = x + a` and `rest = keep * x + step * a` (keep, step: per-sequence factors), the two terms of a `bdia`
    layer's sum. Its backward makes the gradients of x and a in one step and keeps neither input: autograd's own
    three nodes leave an extra stream-sized gradient alive through the attention's backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, a: Tensor, keep: Tensor, step: Tensor
    ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(keep, step)
        return x + a, torch.addcmul(keep * x, step, a)

    @staticmethod
    def backward(ctx: Any, h_grad: Tensor, rest_grad: Tensor) -> tuple[Tensor | None, ...]:
        keep, step = ctx.saved_tensors
        x_grad = torch.addcmul(h_grad, keep, rest_grad) if ctx.needs_input_grad[0] else None
        a_grad = torch.addcmul(h_grad, step, rest_grad) if ctx.needs_input_grad[1] else None
        return x_grad, a_grad, None, None


class RevformerBDIALayer(GradientCheckpointingLayer):
    """A layer of the `bdia` coupling: one whole pre-norm Transformer block `f(p) = A(p) + M(p + A(p))`, so that
    `p + f(p)` is Llama's `h = p + A(p); out = h + M(h)` exactly, joined by `p[l+1] = gamma p[l-1] + out` with
    `out = (1 - gamma) p + (1 + gamma) f(p)` (`update`).

    gamma is drawn in `update`, +-`bdia_gamma` per sequence, in training, and the engine replays the RNG when it
    re-runs the layer, so the re-run draws the same gamma; out of training gamma = 0 and `p[l+1] = p + f(p)` is
    Llama's block. The first layer is a standard block, `p[1] = p[-1] + f(p[0])` with `p[-1] = p[0]`. Everything
    after the attention is position-wise, so the feed-forward computes the whole sum a chunk of tokens at a time
    (`RevformerFeedForward.bdia_tail`), and in the reversible re-run each chunk's gradients with it.
    """

    def __init__(self, config: RevformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = RevformerAttention(config, layer_idx)
        self.attention.is_whole_sublayer = False
        self.feed_forward = RevformerFeedForward(config)
        self.gamma = float(config.bdia_gamma) if layer_idx > 0 else None

    def update(self, x: Tensor, *args: Tensor | Cache | list | None) -> Tensor | tuple[Tensor, Tensor]:
        """What joins the stream two back: `f(x)` for the first layer, else `(out, gamma)` (gamma (B, 1, 1) fp32).
        `args`: what the attention takes besides `x` (rotary tables, masks, cache, attentions list).

        In a reversible re-run whose attention runs in query chunks, the feed-forward's end comes inside the
        attention's chunked call (`QueryChunkedAttention`). That attention draws nothing from the RNG, so gamma is
        drawn before it there and after it otherwise: the same draw either way."""
        fused, hint = self._fusable(x, *args), None
        if fused and torch.is_grad_enabled():  # with grad, only in the engine's re-run
            hint = take_upstream_gradient(x.shape)
            fused = hint is not None
        a = None if fused else self.attention(x, *args)
        gamma = keep = step = None
        if self.gamma is not None:
            if self.training:
                signs = torch.randint(0, 2, (x.shape[0], 1, 1), device=x.device).mul_(2).sub_(1)
                gamma = signs.to(torch.float32) * self.gamma
            else:
                gamma = x.new_zeros(x.shape[0], 1, 1, dtype=torch.float32)
            keep, step = (1.0 - gamma).to(x.dtype), (1.0 + gamma).to(x.dtype)
        scale = 1.0 if step is None else step
        if fused:
            out = self.feed_forward(x, keep=keep, scale=scale, fused_attention=(self.attention, args, hint))
        else:
            out = self.feed_forward(x, attention_output=a, keep=keep, scale=scale)
        return out if gamma is None else (out, gamma)

    def _fusable(self, x: Tensor, *args: Tensor | Cache | list | None) -> bool:
        """Whether the attention can compute the whole layer a chunk of queries at a time: query-chunked attention
        and no hidden dropout between attention and feed-forward. Then the forward pass (no grad) and the re-run (the
        output's gradient announced) run the same chunks."""
        cache, attentions = (*args[4:], None, None)[:2]
        dropout = self.training and self.attention.config.hidden_dropout > 0
        return not dropout and self.attention.chunks_queries(x, cache, attentions)

    def forward(
        self, x1: Tensor, x2: Tensor, *aux: Tensor | None, cache: Cache | None = None,
        streams: StreamArithmetic | None = None, attentions: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The plain path: streams `(p[l-1], p[l])` in, `(p[l], p[l+1])` out (the newest stream second)."""
        streams = streams or StreamArithmetic()
        out = self.update(streams.read(x2), *aux, cache, attentions)
        return x2, streams.join(x1, *split_output(out), invertible=False)[0]


class LayerUpdate(NamedTuple):
    """A `bdia` layer as a sublayer of the engine: a call runs `update`; parameters and modules are the layer's."""

    layer: RevformerBDIALayer

    def __call__(self, x: Tensor, *aux: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
        return self.layer.update(x, *aux)

    def parameters(self):
        return self.layer.parameters()

    def modules(self):
        return self.layer.modules()


class NoUpdate(nn.Module):
    """The partner of the first layer when a `bdia` stack has an odd number of layers: adds nothing."""

    def forward(self, x: Tensor, *aux: Tensor | None) -> Tensor:
        return x * 0.0  # on the graph of x, so the engine can differentiate through it


class LayerPair(NamedTuple):
    """Two consecutive `bdia` layers as the engine's F and G: `p[l+1] = gamma p[l-1] + out_F(p[l])`, then G."""

    f: LayerUpdate | NoUpdate
    g: LayerUpdate


class SublayerCoupling:
    """`coupling="sublayer"`: each layer is a reversible block (`RevformerBlock`), which the engine runs as it is.

    A coupling topology says what a model's layers are and how the streams flow through them: the layers, the units
    the reversible engine runs (each with sublayers `.f` and `.g`), the first streams, the output stream, whether a
    forward draws random numbers of its own, and when the stack is invertible. Pass an instance as
    `RevformerForCausalLM(config, coupling=...)` to run a variant (an `nn.Module` instance trains with the model).
    """

    def layer(self, config: RevformerConfig, index: int) -> nn.Module:
        return RevformerBlock(config, index)

    def units(self, layers: nn.ModuleList) -> list:
        return list(layers)

    def inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x  # the embedding feeds both streams

    def output(self, x1: Tensor, x2: Tensor) -> Tensor:
        return x2  # the newest stream (every layer returns it second)

    def draws_random(self, config: RevformerConfig, training: bool) -> bool:
        return False  # nothing beyond dropout and LSH rotations

    def invertible(self, training: bool) -> bool:
        return True


class BDIACoupling(SublayerCoupling):
    """`coupling="bdia"`: each layer is a whole block (`RevformerBDIALayer`); the engine runs pairs of consecutive
    layers as its F and G. An odd stack starts with a `NoUpdate` partner, which works because `p[-1] = p[0]`.
    Training draws gamma; out of training gamma = 0 and the stack, a standard residual one, is not invertible."""

    no_update = NoUpdate()

    def layer(self, config: RevformerConfig, index: int) -> nn.Module:
        return RevformerBDIALayer(config, index)

    def units(self, layers: nn.ModuleList) -> list[LayerPair]:
        updates = [self.no_update] * (len(layers) % 2) + [LayerUpdate(layer) for layer in layers]
        return [LayerPair(updates[i], updates[i + 1]) for i in range(0, len(updates), 2)]

    def draws_random(self, config: RevformerConfig, training: bool) -> bool:
        return training and config.num_hidden_layers > 1  # each layer after the first draws its gamma

    def invertible(self, training: bool) -> bool:
        return training


COUPLINGS = {"sublayer": SublayerCoupling, "bdia": BDIACoupling}


class RevformerPreTrainedModel(PreTrainedModel):
    config_class = RevformerConfig
    config: RevformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # `activation_checkpointing_enable()` checkpoints each layer of the plain path (`reversible=False`, and the
    # non-reversible forwards that return hidden states or attentions); the reversible path already recomputes
    # every layer in backward, so there the flag is set (Trainer, TRL and PEFT read it) and nothing else changes.
    supports_gradient_checkpointing = True
    # The sublayers, not the layers: the reversible engine calls the sublayers directly, so they are the units that
    # FSDP must gather (and device maps must keep whole).
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
        elif isinstance(module, RevformerRotaryEmbedding):
            inv_freq, _ = module.compute_inv_freq(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


class RevformerModel(RevformerPreTrainedModel):
    """The embedding, the stack of layers and the final norm; returns the hidden state of the newest stream.

    `coupling` (a topology such as `SublayerCoupling()`) and `streams` (a `StreamArithmetic`) replace the ones the
    config names, for variants that no config field describes.
    """

    sequence_parallel = None  # a `SequenceParallel`: the inputs are this rank's slice of each sequence

    def __init__(
        self, config: RevformerConfig, *, coupling: SublayerCoupling | None = None,
        streams: StreamArithmetic | None = None,
    ) -> None:
        super().__init__(config)
        coupling = coupling if coupling is not None else COUPLINGS[config.coupling]()
        self.streams = streams or stream_arithmetic(config.stream_dtype, config.stream_fraction_bits,
                                                    config.bdia_keep_bits)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(coupling.layer(config, i) for i in range(config.num_hidden_layers))
        self.coupling = coupling  # after the layers: a topology's own parameters come where the stack ends
        self.norm = RevformerRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RevformerRotaryEmbedding(config)
        if config.coupling == "bdia" and config.reversible and config.stream_dtype != "fixed_point":
            logger.warning_once(
                "coupling='bdia' with float32 streams: reversible backward divides each stream by bdia_gamma per "
                "layer, so the rebuilt inputs' rounding error grows by 1/bdia_gamma per layer. Set "
                "stream_dtype='fixed_point' to make it exact."
            )
        self.gradient_checkpointing = False
        self.post_init()

    def uses_randomness(self) -> bool:
        """Whether a forward pass draws random numbers (dropout, LSH rotations, gamma) that a re-run must replay."""
        dropout = self.training and (self.config.attention_dropout > 0 or self.config.hidden_dropout > 0)
        drawn = self.coupling.draws_random(self.config, self.training)
        return dropout or drawn or "lsh" in self.config.attention_layers

    def runs_reversibly(self, cache: Cache | None, output_hidden_states: bool, output_attentions: bool) -> bool:
        """Whether a forward goes through the reversible engine: a training forward that keeps nothing per layer."""
        return (self.config.reversible and torch.is_grad_enabled() and cache is None and not output_hidden_states
                and not output_attentions and self.coupling.invertible(self.training))

    @torch.no_grad()
    def reconstruction_error(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> float:
        """max |x - x'| over both streams, x' being the first layer's input rebuilt from the top streams.

        The inverse that reversible backward relies on, run alone: exactly 0.0 with fixed-point streams; with float
        streams it grows with depth and weight size. Call it under the training autocast to measure what training
        sees. Dropout draws are replayed as in backward, and the caller's RNG stream is left untouched. The `bdia`
        coupling is invertible only as trained (gamma != 0): call it in train mode.
        """
        if not self.coupling.invertible(self.training):
            raise ValueError(f"A {self.config.coupling} model is invertible only in train mode (gamma = 0 otherwise): "
                             "call model.train() before reconstruction_error().")
        device = input_ids.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            cos, sin = self.rotary_emb(input_ids, torch.arange(input_ids.shape[1], device=device).unsqueeze(0))
            padded = attention_mask is not None and not bool(attention_mask.all())
            aux = (cos, sin, attention_mask.bool() if padded else None, None)
            x1, x2 = self.coupling.inputs(self.streams.encode(self.embed_tokens(input_ids)))
            units = self.coupling.units(self.layers)
            y1, y2, contexts = forward_blocks(x1, x2, units, aux, self.streams, self.uses_randomness())
            r1, r2 = reconstruct_inputs(y1, y2, units, aux, self.streams, contexts)
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

    def layer_inputs(
        self, embeds: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, cache: Cache | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """What every layer receives besides its streams: the rotary tables cos, sin (B|1, T, D), the padding mask
        (B, T_past + T) bool or None, and the packed-document ids (B, T) or None (`attention.attention_inputs`)."""
        batch, seq = embeds.shape[:2]
        past = int(cache.get_seq_length()) if cache is not None else 0  # a copy: static caches count in place
        sp = self.sequence_parallel
        if sp is not None:  # attention sees the whole sequence: its padding, positions and documents
            if cache is not None:
                raise ValueError("Sequence parallelism runs training forwards only, without a KV cache; generate "
                                 "on one device (revformer.sequence_parallel.sequence_parallel_off).")
            attention_mask, position_ids, seq = sp.gather(attention_mask), sp.gather(position_ids), seq * sp.size
        key_padding_mask, position_ids, document_ids = attention_inputs(
            attention_mask, position_ids, batch, seq, past, cache is not None, embeds.device
        )
        self._warn_past_trained_length(past + seq, position_ids)
        if sp is not None:  # the rotary tables of this rank's tokens
            position_ids = sp.local(position_ids)
        cos, sin = self.rotary_emb(embeds, position_ids)
        return cos, sin, key_padding_mask, document_ids

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
        config = self.config
        check_inputs(input_ids, inputs_embeds, config.vocab_size)
        cache = cache if cache is not None else past_key_values
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        return_dict = config.return_dict if return_dict is None else return_dict
        # A KV cache only when one is passed or asked for (generate does both): an evaluation forward would otherwise
        # build a cache of every layer's keys and values that nobody reads.
        use_cache = cache is not None if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        aux = self.layer_inputs(inputs_embeds, attention_mask, position_ids, cache)

        # Streams stay fp32 (or fixed point) whatever the layers compute in.
        attentions = [] if output_attentions else None
        if self.runs_reversibly(cache, output_hidden_states, output_attentions):  # it encodes the streams itself
            units = self.coupling.units(self.layers)
            x1, x2 = reversible_stack(*self.coupling.inputs(inputs_embeds), units, aux, self.streams,
                                      self.uses_randomness(), encode=True)
        else:
            x1, x2 = self.coupling.inputs(self.streams.encode(inputs_embeds))
            hidden_states = [self.streams.decode(self.coupling.output(x1, x2))] if output_hidden_states else None
            for layer in self.layers:  # each layer checkpoints itself when enabled (GradientCheckpointingLayer)
                x1, x2 = layer(x1, x2, *aux, cache=cache, streams=self.streams, attentions=attentions)
                if output_hidden_states:
                    hidden_states.append(self.streams.decode(self.coupling.output(x1, x2)))

        output = BaseModelOutputWithPast(
            last_hidden_state=self.norm(self.streams.decode(self.coupling.output(x1, x2))),
            cache=cache if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


def check_inputs(input_ids: Tensor | None, inputs_embeds: Tensor | None, vocab_size: int) -> None:
    """Clear errors for inputs the model cannot run: both or neither of input_ids and inputs_embeds, no tokens, or a
    token id outside the vocabulary (torch's is `index out of range in self`, or a device-side assert on CUDA that
    ends the process)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    name, given = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
    if given.shape[1] == 0:
        raise ValueError(f"Empty input: {name} has shape {tuple(given.shape)}, no tokens to run; pass at least one "
                         "token per row (check the tokenizer's output for an empty text).")
    if input_ids is None or input_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"Token id {bad} is outside this model's vocabulary (ids 0..{vocab_size - 1}, vocab_size={vocab_size}). "
            "The tokenizer probably does not belong to this model: load the one saved with it, or resize the "
            "embeddings with model.resize_token_embeddings(len(tokenizer)) after adding tokens."
        )


class RevformerForCausalLM(RevformerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    sequence_parallel = None  # a `SequenceParallel`: labels are this rank's slice, the loss its share of the mean

    def __init__(
        self, config: RevformerConfig, *, coupling: SublayerCoupling | None = None,
        streams: StreamArithmetic | None = None,
    ) -> None:
        super().__init__(config)
        self.model = RevformerModel(config, coupling=coupling, streams=streams)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
        logits_to_keep: int | Tensor = 0,
        past_key_values: Cache | None = None,
        teacher: Teacher | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Next-token logits and, given `labels` (the input ids, shifted inside) or `shift_labels` (already shifted:
        position t predicts shift_labels[t]), the mean cross-entropy; `num_items_in_batch` (Trainer, gradient
        accumulation) replaces the local count of predicted tokens as its denominator.

        Distillation: given a `Teacher` (its final hidden states for the same inputs and its LM-head weight), the
        loss is KL(teacher || model) per predicted token plus `teacher.ce_weight` times the cross-entropy.

        Given labels for more than `config.loss_chunk_size` positions (batch x length), the LM head and the loss run
        in chunks of that many positions and `logits` is None: full-sequence logits are what chunking exists to
        avoid. Otherwise the LM head runs once and its logits give the loss. Other keywords (`output_hidden_states`,
        `output_attentions`, `return_dict`) are the base model's.

        Under sequence parallelism (`sequence_parallel`) every input is this rank's slice of the sequences
        (`shift_labels` too, shifted on the whole sequences) and the loss is P x this rank's share of the mean over
        all their tokens: the mean over the group's ranks is the loss.
        """
        shift_labels, num_items_in_batch = kwargs.pop("shift_labels", None), kwargs.pop("num_items_in_batch", None)
        return_dict = kwargs.pop("return_dict", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            return_dict=True, **kwargs,
        )
        hidden = outputs.last_hidden_state  # (B, T, d)
        chunk = self.config.loss_chunk_size
        loss = logits = None
        sp = self.sequence_parallel
        if sp is not None and (labels is not None or shift_labels is not None):
            # Shifted on the whole sequence; P x this rank's share of the mean, so the group's mean is the mean.
            shift_labels = sp.shift_labels(labels) if shift_labels is None else shift_labels
            num_items_in_batch = sp.loss_denominator(shift_labels, num_items_in_batch)
        if labels is None and shift_labels is not None:
            labels = shift_labels  # only its shape and presence matter from here
        if not (labels is not None and 0 < chunk < hidden.shape[1] * hidden.shape[0]):
            # logits_to_keep=k keeps the last k positions (generation needs only the last one); 0 keeps all.
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
        if labels is not None:
            full = logits if logits is not None and logits.shape[1] == hidden.shape[1] else None
            teacher = teacher.check(hidden, self.config.vocab_size) if teacher is not None else None
            loss = causal_lm_loss(hidden, self.lm_head, labels, chunk, num_items_in_batch, logits=full, teacher=teacher,
                                  shift_labels=shift_labels)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "BDIACoupling",
    "RevformerForCausalLM",
    "RevformerModel",
    "RevformerPreTrainedModel",
    "SublayerCoupling",
]
