"""The models the benchmarks compare, at the same width, depth, heads, vocabulary and sequence length, and one
training step of them.

- ``revformer``: RevformerForCausalLM, reversible engine;
- ``revformer_plain``: the same model with ``reversible=False`` (ordinary autograd);
- ``revformer_mean``: revformer whose hidden state is the mean of its two top streams (``topologies.MeanMerge``;
  the ablations' base);
- ``revformer_bdia``: revformer with the ``bdia`` coupling (gamma 1/16, fixed-point streams), reversible;
- ``revformer_bdia_gamma64``: the same with gamma 1/64 (6 residue bits per stream element and layer);
- ``revformer_merge_newest``, ``revformer_merge_learned``, ``revformer_embed_one``, ``revformer_scaled_init``:
  ablations of ``revformer_mean``, one change each (`ABLATIONS`, built from ``benchmarks.topologies``), for the
  depth-quality suite;
- ``llama`` / ``llama_ckpt``: Hugging Face LlamaForCausalLM (sdpa), without / with activation checkpointing;
- ``llama_scaled_init``: ``llama`` with GPT-2's depth-scaled initialisation of the weights that write into the residual
  stream (o_proj and down_proj at std 0.02 / sqrt(2 * layers), `scale_output_init`), for the depth-quality suite;
- ``llama_ckpt_offload``: ``llama_ckpt_chunked`` whose checkpointed layer inputs live in host memory
  (``activation_checkpointing_enable(offload=True)``; needs an accelerator);
- ``llama_ckpt_chunked``: ``llama_ckpt`` whose loss runs over `LOSS_CHUNK`-token chunks, each chunk's logits recomputed
  in backward (`ChunkedLossLlamaForCausalLM`): what users get from TRL or a fused/chunked linear cross-entropy, so
  the full (tokens x vocabulary) logits never exist;
- ``reformer``: Hugging Face ReformerModelWithLMHead (causal; local attention, or LSH with ``attention="lsh"``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ABLATIONS = {  # model name -> the one change it makes to revformer_mean (the sublayer stack with the mean merge)
    "revformer_merge_newest": "output: the newest stream y2 instead of the mean (y1 + y2) / 2",
    "revformer_merge_learned": "output: w1 * y1 + w2 * y2, learned per channel from 0.5",
    "revformer_embed_one": "input: the embedding feeds one stream (x1 = 0, x2 = embedding; attention reads x2 first)",
    "revformer_scaled_init": "initialisation: o_proj and down_proj at std 0.02 / sqrt(2 * layers) (GPT-2's)",
}
BDIA_GAMMAS = {"revformer_bdia": None, "revformer_bdia_gamma64": 2**-6}  # None: convert.py's (BDIA_GAMMA, 1/16)
MODELS = ("revformer", "revformer_plain", "revformer_mean", *BDIA_GAMMAS, *ABLATIONS, "llama", "llama_scaled_init",
          "llama_ckpt", "llama_ckpt_chunked", "llama_ckpt_offload", "reformer")
LOSS_CHUNK = 1024  # llama_ckpt_chunked: tokens per chunk of its loss
# What the depth/length suites run unless told: the shipped model, its plain path and the baselines.
# llama_ckpt_offload needs an accelerator (its host copies are pinned): the memory suite runs it on CUDA only.
DEFAULT_MODELS = tuple(m for m in MODELS if m not in ("revformer_mean", *BDIA_GAMMAS, *ABLATIONS, "llama_scaled_init",
                                                      "llama_ckpt_offload"))
LABELS = {
    "revformer": "revformer (reversible)",
    "revformer_plain": "revformer (reversible=False)",
    "revformer_mean": "revformer, mean merge (earlier default)",
    "revformer_bdia": "revformer, bdia coupling (gamma 1/16)",
    "revformer_bdia_gamma64": "revformer, bdia coupling (gamma 1/64)",
    "revformer_merge_newest": "revformer, merge: newest stream",
    "revformer_merge_learned": "revformer, merge: learned",
    "revformer_embed_one": "revformer, embedding into one stream",
    "revformer_scaled_init": "revformer, scaled output init",
    "llama": "Llama",
    "llama_scaled_init": "Llama, depth-scaled init (GPT-2)",
    "llama_ckpt": "Llama + checkpointing",
    "llama_ckpt_chunked": "Llama + checkpointing + chunked loss",
    "llama_ckpt_offload": "Llama + checkpointing offloaded to host + chunked loss",
    "reformer": "HF Reformer (local)",
}
# Plot style per model (colour, marker, line): overlapping curves stay visible.
STYLES = {"revformer": ("C0", "o", "-"), "revformer_plain": ("C1", "s", "--"), "revformer_mean": ("C0", "o", ":"),
          "revformer_bdia": ("C5", "P", "-."),
          "revformer_bdia_gamma64": ("C6", "X", "-."), "revformer_merge_newest": ("C7", "<", ":"),
          "revformer_merge_learned": ("C7", "h", "--"),
          "revformer_embed_one": ("C8", ">", ":"), "revformer_scaled_init": ("C9", "*", ":"),
          "llama": ("C2", "^", "-"), "llama_scaled_init": ("C2", "v", "--"),
          "llama_ckpt": ("C3", "v", "--"), "llama_ckpt_chunked": ("C1", "<", "-."),
          "llama_ckpt_offload": ("C1", ">", ":"), "reformer": ("C4", "D", ":")}


@dataclass
class Spec:
    """One model configuration for one training step."""

    model: str
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as num_heads
    intermediate_size: int = 0  # 0: SwiGLU default, 8/3 * hidden_size rounded up to a multiple of 8
    vocab_size: int = 259  # byte-level: 256 bytes + 3 specials
    seq_len: int = 1024
    batch_size: int = 1
    attention: str = "full"  # revformer's kernel: full | local | lsh (Reformer: lsh, else local)
    attn_chunk: int = 128  # local / lsh chunk length (revformer and Reformer)
    chunk: int | None = None  # revformer chunk_size_feed_forward and loss_chunk_size (0 = none, and no attention
    # query chunks; None = defaults)
    ff_chunk: int | None = None  # chunk_size_feed_forward alone, overriding `chunk` (Reformer: its FF chunk)
    loss_chunk: int | None = None  # loss_chunk_size alone, overriding `chunk` (Reformer: its LM-head chunk)
    device: str = "cpu"
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    threads: int = 1
    seed: int = 0
    rope_theta: float | None = None  # None: each config's default (10000)
    rms_norm_eps: float | None = None  # None: each config's default (1e-6)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {MODELS}")
        if not self.intermediate_size:
            self.intermediate_size = -(-8 * self.hidden_size // 3 // 8) * 8

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `num_kv_heads`, or as many as `num_heads` (records before the field: the same)."""
        return self.num_kv_heads or self.num_heads

    def replace(self, **changes: Any) -> Spec:
        return dataclasses.replace(self, **changes)


# Hub models' shapes (`compare --shape NAME`): Spec fields that replace a part's sizes.
SHAPES: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M: tied embeddings (as every model here), GQA 9 heads / 3 key-value heads
    "smollm2-135m": {"hidden_size": 576, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
                     "intermediate_size": 1536, "vocab_size": 49152, "rope_theta": 100000.0, "rms_norm_eps": 1e-5},
    # meta-llama/Llama-3.2-1B: tied embeddings, GQA 32 heads / 8 key-value heads (its llama3 RoPE scaling left out:
    # it changes no tensor's size)
    "llama-3.2-1b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8,
                     "intermediate_size": 8192, "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5},
}


def spec_from(sizes: dict[str, Any], model: str, **overrides: Any) -> Spec:
    """A Spec from a suite's sizes (keys that are no Spec field are ignored) and overrides."""
    keys = {f.name for f in dataclasses.fields(Spec)}
    return Spec(**{**{k: v for k, v in sizes.items() if k in keys}, "model": model, **overrides})


def build_model(spec: Spec) -> Any:
    """The model `spec.model`, seeded, in training mode, on `spec.device` (fp32 weights)."""
    import torch

    torch.manual_seed(spec.seed)
    common = {"vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
              "num_attention_heads": spec.num_heads, "max_position_embeddings": spec.seq_len, "use_cache": False}
    rope = ({} if spec.rope_theta is None
            else {"rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta}})
    eps = {} if spec.rms_norm_eps is None else {"rms_norm_eps": spec.rms_norm_eps}
    buckets = max(2, spec.seq_len // spec.attn_chunk // 2 * 2)  # ~one bucket per chunk, even
    if spec.model.startswith("revformer"):
        from revformer import RevformerConfig, RevformerForCausalLM
        from revformer.conversion import BDIA_GAMMA

        chunks = {"chunk_size_feed_forward": spec.chunk if spec.ff_chunk is None else spec.ff_chunk,
                  "loss_chunk_size": spec.chunk if spec.loss_chunk is None else spec.loss_chunk,
                  "chunk_size_attention": 0 if spec.chunk == 0 else None}
        # revformer_bdia*: the coupling convert.py produces (a Llama block stack out of training), from scratch
        bdia = {"coupling": "bdia", "stream_dtype": "fixed_point",
                "bdia_gamma": BDIA_GAMMAS.get(spec.model) or BDIA_GAMMA}
        from .topologies import topology

        config = RevformerConfig(
            **common, intermediate_size=spec.intermediate_size, reversible=spec.model != "revformer_plain",
            **(bdia if spec.model in BDIA_GAMMAS else {}), num_key_value_heads=spec.kv_heads, **rope, **eps,
            attention_layers=spec.attention, local_chunk_length=spec.attn_chunk, lsh_chunk_length=spec.attn_chunk,
            lsh_num_buckets=buckets, lsh_num_hashes=2, **{k: v for k, v in chunks.items() if v is not None},
        )  # fmt: skip
        model = RevformerForCausalLM(config, coupling=topology(spec.model, spec.hidden_size))
        if spec.model == "revformer_scaled_init":
            scale_output_init(model)
    elif spec.model.startswith("llama"):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**common, intermediate_size=spec.intermediate_size, num_key_value_heads=spec.kv_heads,
                             tie_word_embeddings=True, attn_implementation="sdpa", **rope, **eps)
        chunked = spec.model in ("llama_ckpt_chunked", "llama_ckpt_offload")
        model = (chunked_loss_llama_class() if chunked else LlamaForCausalLM)(config)
        if spec.model in ("llama_ckpt", "llama_ckpt_chunked"):
            model.activation_checkpointing_enable()
        if spec.model == "llama_ckpt_offload":  # checkpointed layer inputs kept in pinned host memory
            model.activation_checkpointing_enable(offload=True)
        if spec.model == "llama_scaled_init":
            scale_output_init(model)
    else:
        from transformers import ReformerConfig, ReformerModelWithLMHead

        if spec.attention == "lsh":  # as many hashes and buckets as revformer's lsh layers
            kind = {"attn_layers": ["lsh"] * spec.num_layers, "lsh_attn_chunk_length": spec.attn_chunk,
                    "lsh_num_chunks_before": 1, "lsh_num_chunks_after": 0, "num_hashes": 2, "num_buckets": buckets}
        else:
            kind = {"attn_layers": ["local"] * spec.num_layers, "local_attn_chunk_length": spec.attn_chunk,
                    "local_num_chunks_before": 1, "local_num_chunks_after": 0}
        # Its feed-forward has 2 matrices (SwiGLU has 3): 1.5x wider gives the same parameters per layer.
        config = ReformerConfig(
            **common, **kind, feed_forward_size=3 * spec.intermediate_size // 2,
            attention_head_size=spec.hidden_size // spec.num_heads, is_decoder=True, axial_pos_embds=False,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
            lsh_attention_probs_dropout_prob=0.0, chunk_size_lm_head=spec.loss_chunk or 0,
            chunk_size_feed_forward=spec.ff_chunk or 0, pad_token_id=0,
        )  # fmt: skip
        model = ReformerModelWithLMHead(config)
    return model.to(spec.device).train()


def chunked_causal_lm_loss(hidden: Any, lm_head: Any, labels: Any, chunk: int = LOSS_CHUNK,
                           num_items_in_batch: Any = None) -> Any:
    """LlamaForCausalLM's loss (next-token shift, -100 ignored, fp32 logits, mean over the predicted tokens) from the
    last hidden states, over `chunk`-token chunks whose logits are recomputed in backward: at most one chunk's
    logits (and their fp32 copy and softmax) are alive at a time, forward or backward."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h: Any, y: Any) -> Any:
        return F.cross_entropy(lm_head(h).float(), y, ignore_index=-100, reduction="sum")

    targets = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(hidden.device)  # the next token's id
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk):
        y = targets[start:start + chunk]
        total = total + checkpoint(chunk_loss, flat[start:start + chunk], y, use_reentrant=False)
    count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / count


_CHUNKED_LOSS_LLAMA: Any = None


def chunked_loss_llama_class() -> Any:
    """`ChunkedLossLlamaForCausalLM`: LlamaForCausalLM whose forward with labels computes `chunked_causal_lm_loss`
    (and returns no logits), so every caller of ``model(input_ids=..., labels=...)`` takes the chunked path."""
    global _CHUNKED_LOSS_LLAMA
    if _CHUNKED_LOSS_LLAMA is None:
        from transformers import LlamaForCausalLM
        from transformers.modeling_outputs import CausalLMOutputWithPast

        class ChunkedLossLlamaForCausalLM(LlamaForCausalLM):
            loss_chunk = LOSS_CHUNK

            def forward(self, input_ids: Any = None, labels: Any = None, **kwargs: Any) -> Any:
                if labels is None:
                    return super().forward(input_ids=input_ids, **kwargs)
                num_items = kwargs.pop("num_items_in_batch", None)
                kwargs.pop("logits_to_keep", None)
                outputs = self.model(input_ids=input_ids, **kwargs)
                loss = chunked_causal_lm_loss(outputs.last_hidden_state, self.lm_head, labels, self.loss_chunk,
                                              num_items)
                return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                              attentions=outputs.attentions)

        _CHUNKED_LOSS_LLAMA = ChunkedLossLlamaForCausalLM
    return _CHUNKED_LOSS_LLAMA


def depth_scaled_std(layers: int, initializer_range: float = 0.02) -> float:
    """GPT-2's std for the weights that write into the residual stream: initializer_range / sqrt(2 * layers)."""
    return initializer_range / (2 * layers) ** 0.5


def scale_output_init(model: Any) -> None:
    """Re-draw every o_proj and down_proj weight (attention output and MLP down projection of each block, revformer's
    or Llama's) from normal(0, `depth_scaled_std`), in place, in parameter order, after the model's own
    initialisation: the draws continue the generator that `build_model` seeded."""
    import torch

    std = depth_scaled_std(model.config.num_hidden_layers, model.config.initializer_range)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weight.normal_(0.0, std)


def make_optimizer(model: Any, lr: float = 1e-4, weight_decay: float = 0.0, betas: tuple = (0.9, 0.95)) -> Any:
    """AdamW over every parameter (decay included), fused (one kernel per step, no foreach temporaries, so it never
    sets the peak)."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def autocast(device: str, dtype: str) -> Any:
    """bf16 autocast on `device`'s type when `dtype` is bf16, else a no-op context."""
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")


def forward_backward(model: Any, ids: Any, device: str, dtype: str) -> Any:
    """Forward with labels and backward; the loss, detached."""
    with autocast(device, dtype):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def train_step(model: Any, optimizer: Any, ids: Any, device: str, dtype: str, clip: float | None = None) -> float:
    """One full training step: forward with labels, backward, (clip,) optimizer step, zero grads."""
    import torch

    loss = forward_backward(model, ids, device, dtype)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def random_ids(spec: Spec, seq_len: int | None = None) -> Any:
    """Token ids of one batch, seeded by the spec (the 3 special ids left out)."""
    import torch

    generator = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(3, spec.vocab_size, (spec.batch_size, seq_len or spec.seq_len), generator=generator)
    return ids.to(spec.device)


def synchronize(device: str) -> None:
    """Wait for the GPU, so a timer measures the work and not its launch."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def param_stats(model: Any, optimizer: Any | None = None) -> dict[str, int]:
    """Parameter count and the bytes of parameters, gradients (one per trainable parameter) and optimizer state."""
    import torch

    params = list(model.parameters())
    state = 0
    if optimizer is not None:
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v))
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return {"params": sum(p.numel() for p in params), "param_bytes": param_bytes, "grad_bytes": grad_bytes,
            "optimizer_state_bytes": state, "static_bytes": param_bytes + grad_bytes + state}
