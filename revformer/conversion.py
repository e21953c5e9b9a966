"""Convert a pretrained Llama-family causal LM into a reversible revformer model, reusing its weights unchanged.

    from revformer import convert_to_revformer
    model = convert_to_revformer("HuggingFaceTB/SmolLM2-135M", "runs/smollm2-rev")   # or scripts/convert.py

Supported: the Llama family as transformers implements it (`LlamaForCausalLM`: Llama 2/3.x, TinyLlama,
SmolLM/SmolLM2; `MistralForCausalLM`; `Qwen2ForCausalLM`; `Qwen3ForCausalLM`), whose block is the pre-norm
`h = p + A(RMSNorm p); out = h + M(RMSNorm h)` with rotary attention (grouped-query, optional q/k/v biases, optional
per-head q/k norm) and a SwiGLU feed-forward. Every source tensor lands in exactly one place (`weight_map`).

A residual stack is not invertible, so no reversible network computes the source's function in training. The default
`bdia` coupling computes it exactly out of training (gamma = 0) and only in training perturbs it into an invertible
stack, so a converted model needs no healing; `sublayer` changes the function and is healed by a short
distillation (`train.distill_from`). What each costs and wins back is measured in docs/conversion.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .configuration_revformer import COUPLINGS, RevformerConfig
from .modeling_revformer import RevformerForCausalLM

# gamma of a converted bdia model: training then runs a network 0.5% off the source's loss (1/2, the value for
# training from scratch, is 67% off; docs/conversion.md), for 4 bits kept per stream element and layer.
BDIA_GAMMA = 2.0**-4

SUPPORTED = {
    "llama": "LlamaForCausalLM (Llama 2/3.x, TinyLlama, SmolLM, SmolLM2)",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Why some common architectures cannot be converted (anything else: its block is not the Llama-family block).
_UNSUPPORTED_REASONS = {
    "gpt2": "learned absolute positions, LayerNorm with biases and a GELU MLP",
    "gpt_neox": "parallel attention and MLP with LayerNorm and partial rotary embeddings",
    "mixtral": "a mixture-of-experts feed-forward",
    "qwen2_moe": "a mixture-of-experts feed-forward",
    "qwen3_moe": "a mixture-of-experts feed-forward",
    "gemma": "embedding scaling and (1 + weight) RMSNorm",
    "gemma2": "logit soft-capping, sandwich norms and alternating sliding windows",
    "phi3": "fused qkv and gate/up projections",
}

# Source tensor name -> revformer tensor name. Both couplings use the same names, since a bdia layer and a sublayer
# block hold the same `attention` and `feed_forward` modules.
_WEIGHT_RULES = (
    (r"model\.embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"model\.norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"model.layers.\1.attention.norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", r"model.layers.\1.attention.\2_proj.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"model.layers.\1.attention.\2_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"model.layers.\1.feed_forward.norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"model.layers.\1.feed_forward.\2_proj.\3"),
)


class ConversionError(ValueError):
    """A source model that cannot be converted; the message says what is supported and why this one is not."""


def _unsupported(source_config: Any, why: str, name: str | None = None) -> ConversionError:
    names = ", ".join(SUPPORTED.values())
    arch = name or ", ".join(getattr(source_config, "architectures", None) or [getattr(source_config, "model_type", "?")])
    return ConversionError(
        f"Cannot convert {arch} (model_type {getattr(source_config, 'model_type', None)!r}) to revformer: {why}. "
        f"Supported: {names}, i.e. pre-norm RMSNorm blocks with rotary attention and a SwiGLU feed-forward, "
        f"which a revformer layer reproduces exactly."
    )


def check_convertible(source_config: Any, name: str | None = None) -> None:
    """Raise `ConversionError` unless a revformer layer can compute the source's blocks exactly (`name`: the
    source's class, for the message)."""
    model_type = getattr(source_config, "model_type", None)
    if model_type not in SUPPORTED:
        design = _UNSUPPORTED_REASONS.get(model_type, "a different design")
        raise _unsupported(source_config, name=name, why=f"its blocks use {design}")
    if getattr(source_config, "hidden_act", "silu") != "silu":
        act = source_config.hidden_act
        raise _unsupported(source_config, name=name, why=f"hidden_act={act!r} (revformer's feed-forward is SwiGLU)")
    window = getattr(source_config, "sliding_window", None)
    layer_types = getattr(source_config, "layer_types", None) or []
    if getattr(source_config, "use_sliding_window", True) and window is not None and (
        window < source_config.max_position_embeddings or "sliding_attention" in layer_types
    ):
        raise _unsupported(
            source_config,
            name=name,
            why=f"sliding-window attention (window {window} < context {source_config.max_position_embeddings}); "
            f"revformer's `local` kernel attends in fixed chunks, not a sliding window, so it cannot reproduce it "
            f"(a model whose window covers its whole context converts)",
        )
    rope = getattr(source_config, "rope_parameters", None) or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(source_config, name=name, why="partial rotary embeddings (partial_rotary_factor != 1)")


def revformer_config_from(
    source_config: Any, coupling: str = "bdia", name: str | None = None, **overrides: Any
) -> RevformerConfig:
    """The RevformerConfig whose layers compute the source's blocks, joined by `coupling`; `overrides` win.
    `name`: the source's class, for the error message of an unsupported source."""
    check_convertible(source_config, name)
    if coupling not in COUPLINGS:
        raise ConversionError(f"coupling must be one of {COUPLINGS}, got {coupling!r}.")
    sc = source_config
    model_type = sc.model_type
    head_dim = getattr(sc, "head_dim", None) or sc.hidden_size // sc.num_attention_heads
    fields = dict(
        vocab_size=sc.vocab_size,
        hidden_size=sc.hidden_size,
        intermediate_size=sc.intermediate_size,
        num_hidden_layers=sc.num_hidden_layers,
        num_attention_heads=sc.num_attention_heads,
        num_key_value_heads=getattr(sc, "num_key_value_heads", None) or sc.num_attention_heads,
        head_dim=head_dim,
        max_position_embeddings=sc.max_position_embeddings,
        rms_norm_eps=sc.rms_norm_eps,
        rope_parameters=dict(sc.rope_parameters),
        attention_dropout=float(getattr(sc, "attention_dropout", 0.0) or 0.0),
        initializer_range=getattr(sc, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(sc, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(sc, "attention_bias", False)) and model_type != "qwen2",
        qkv_bias=model_type == "qwen2",  # Qwen2 always has q/k/v biases (and none on o_proj)
        mlp_bias=bool(getattr(sc, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        bos_token_id=sc.bos_token_id,
        eos_token_id=sc.eos_token_id,
        pad_token_id=sc.pad_token_id,
        coupling=coupling,
        # bdia's inverse divides by gamma: exact only on fixed-point streams.
        stream_dtype="fixed_point" if coupling == "bdia" else "float32",
        bdia_gamma=BDIA_GAMMA,
        source_config=source_record(sc),
    )
    return RevformerConfig(**{**fields, **overrides})


def source_record(source_config: Any) -> dict[str, Any]:
    """What `export.py` needs to write the source architecture back: its non-default config values, its
    `model_type` and the name it was loaded from."""
    record = source_config.to_diff_dict()
    record.pop("transformers_version", None)
    record["model_type"] = source_config.model_type
    if getattr(source_config, "_name_or_path", ""):
        record["_name_or_path"] = source_config._name_or_path
    return record


def weight_map(source_names: list[str], tied: bool) -> dict[str, str]:
    """Where each source tensor goes: {source name: revformer name}. Raises if any source tensor has no place
    (conversion must lose nothing). With tied embeddings the source's `lm_head.weight` is the embedding itself."""
    mapping, unplaced = {}, []
    for name in source_names:
        if tied and name == "lm_head.weight":
            mapping[name] = "model.embed_tokens.weight"
            continue
        for pattern, target in _WEIGHT_RULES:
            if re.fullmatch(pattern, name):
                mapping[name] = re.sub(pattern, target, name)
                break
        else:
            unplaced.append(name)
    if unplaced:
        raise ConversionError(f"No place in revformer for source tensor(s) {unplaced[:8]}: this checkpoint holds "
                              f"parameters a Llama-family block does not have.")
    return mapping


def convert_model(source: Any, coupling: str = "bdia", **overrides: Any) -> RevformerForCausalLM:
    """A RevformerForCausalLM holding the weights of the loaded source model (every tensor placed, shapes checked)."""
    config = revformer_config_from(source.config, coupling, type(source).__name__, **overrides)
    state = source.state_dict()
    mapping = weight_map(list(state), tied=config.tie_word_embeddings)
    dtype = next(iter(state.values())).dtype
    model = RevformerForCausalLM(config).to(dtype)
    target = model.state_dict()
    missing = set(target) - set(mapping.values()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise ConversionError(f"The source has no tensor for revformer's {sorted(missing)[:8]}.")
    with torch.no_grad():
        for name, tensor in state.items():
            place = target[mapping[name]]
            if place.shape != tensor.shape:
                raise ConversionError(f"Source tensor {name} has shape {tuple(tensor.shape)}, revformer's "
                                      f"{mapping[name]} {tuple(place.shape)}.")
            place.copy_(tensor)
    model.generation_config = source.generation_config
    return model.eval()


def model_card(source_name: str, config: RevformerConfig) -> str:
    bdia = config.coupling == "bdia"
    next_step = (
        "Out of training it computes the source's function exactly (the `bdia` coupling, whose gamma is 0 there): "
        "generation and the KV cache are the source's. In training each layer after the first draws gamma = "
        "+-bdia_gamma per sequence, which makes the stack invertible (exactly, on its fixed-point streams). "
        "Fine-tune it directly:"
        if bdia else
        "A residual stack is not invertible, so this model does not compute the source's function exactly until it "
        "is healed by a short distillation from the source:"
    )
    return "\n".join([
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [revformer, reversible-transformer, causal-lm, custom_code, converted]",
        f"base_model: {source_name}" if not Path(source_name).exists() else "",
        "---",
        "",
        f"# {source_name}, converted to a reversible revformer model",
        "",
        f"The weights of `{source_name}` unchanged, in a reversible stack ({config.num_hidden_layers} layers, "
        f"`{config.coupling}` coupling): activation memory in training "
        + (f"grows by {config.bdia_keep_bits} bits per stream element and layer, not a stored activation."
           if bdia else "no longer grows with depth."),
        "",
        next_step,
        "",
        "```",
        f"accelerate launch scripts/finetune.py --config configs/{'finetune' if bdia else 'heal'}.yaml "
        "--train.init_from THIS_FOLDER \\",
        "    --data.dataset YOUR_TEXT" if bdia else f"    --train.distill_from {source_name} --data.dataset YOUR_TEXT",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", trust_remote_code=True)',
        "```",
        "",
    ])


def convert_to_revformer(
    source: str,
    output_dir: str | Path | None = None,
    coupling: str = "bdia",
    dtype: str | torch.dtype | None = None,
    **overrides: Any,
) -> RevformerForCausalLM:
    """Convert a Hub id or local folder of a Llama-family causal LM; with `output_dir`, write an ordinary revformer
    folder there (config, safetensors weights, the source's tokenizer, model code and `auto_map`, a model card).

    `dtype`: the weights' dtype (default: the source's); `overrides`: RevformerConfig fields (e.g. memory options).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_convertible(AutoConfig.from_pretrained(source))  # before downloading any weights
    source_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto")
    model = convert_model(source_model, coupling, **overrides)
    del source_model
    if output_dir is not None:
        out = Path(output_dir)
        model.save_pretrained(out, safe_serialization=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:  # a weights-only folder: the model still works with the source's
            print(f"warning: no tokenizer saved ({type(err).__name__}: {err}); use the source's tokenizer.")
        else:
            tokenizer.save_pretrained(out)
        (out / "README.md").write_text(model_card(source, model.config))
    return model


__all__ = ["ConversionError", "SUPPORTED", "check_convertible", "convert_model", "convert_to_revformer",
           "revformer_config_from", "weight_map"]
