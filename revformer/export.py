"""Export a `bdia` revformer model as the Llama, Mistral, Qwen2 or Qwen3 checkpoint it computes out of training.

    from revformer import export_model
    export_model("runs/finetune/model", "runs/qwen3-finetuned")   # or scripts/export.py

Out of training a `bdia` model computes `p[l+1] = p[l] + f_l(p[l])` with `f_l` a pre-norm Llama-family block: it is
that architecture, exactly. The export is the folder transformers itself writes for it (its config class and
`model_type`, safetensors under its tensor names, the tokenizer and generation config, a model card): it loads with
`AutoModelForCausalLM.from_pretrained(folder)` where revformer is not installed, without remote code, and in the
serving stacks that load those architectures.

Which architecture: the source a converted model came from (`RevformerConfig.source_config`, recorded by
`convert.py`, so that the source's own config values come back), else, for a model trained from scratch, Qwen3 with
`qk_norm`, Qwen2 with `qkv_bias`, otherwise Llama. A model whose function no standard architecture computes (the
`sublayer` coupling, `local` or `lsh` attention, a coarse fixed-point grid) is refused with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from .configuration_revformer import RevformerConfig
from .conversion import SUPPORTED, weight_map
from .modeling_revformer import RevformerForCausalLM

# Out of training, fixed-point streams round each layer's output to a grid of 2^-stream_fraction_bits; from 24 bits
# that step (6e-8) is below fp32's own rounding of activations of magnitude 1, so the export computes the same
# function; coarser grids change it.
EXPORT_MIN_FRACTION_BITS = 24

# The architecture fields a revformer config holds for its source, under the same names; they win over the
# recorded source values (they are what the weights are).
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
    "attention_dropout", "initializer_range", "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id",
    "pad_token_id",
)  # fmt: skip
# Recorded source keys that describe the saved file, not the model: save_pretrained writes them afresh.
_FILE_KEYS = ("transformers_version", "architectures", "dtype", "torch_dtype", "auto_map", "_name_or_path",
              "model_type")


class ExportError(ValueError):
    """A model no standard architecture computes; the message says why and what can be exported."""


def export_family(config: RevformerConfig) -> str:
    """The `model_type` the export takes: the converted source's, else qwen3 (q/k norm), qwen2 (q/k/v biases) or
    llama."""
    recorded = (config.source_config or {}).get("model_type")
    if recorded:
        return recorded
    return "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"


def check_exportable(config: RevformerConfig) -> None:
    """Raise `ExportError` naming every reason the model's function is not a standard architecture's."""
    family = export_family(config)
    reasons = []
    if config.coupling != "bdia":
        reasons.append(f"its coupling is {config.coupling!r}: two streams joined as y1 = x1 + A(x2), y2 = x2 + M(y1), "
                       "which no residual Transformer computes")
    other = sorted(set(config.attention_layers) - {"full"})
    if other:
        reasons.append(f"its attention_layers include {other}, which the standard architectures' dense causal "
                       "attention does not compute")
    if config.stream_dtype == "fixed_point" and config.stream_fraction_bits < EXPORT_MIN_FRACTION_BITS:
        reasons.append(f"its fixed-point streams round every layer's output to 2^-{config.stream_fraction_bits} "
                       f"(stream_fraction_bits < {EXPORT_MIN_FRACTION_BITS} changes the function)")
    if family not in SUPPORTED:
        reasons.append(f"its recorded source architecture {family!r} is not one of {sorted(SUPPORTED)}")
    # What each family's block has: q/k/v(/o) biases, feed-forward biases, q/k norm.
    if config.qk_norm and (config.qkv_bias or config.mlp_bias):
        reasons.append("q/k norm (Qwen3) together with qkv_bias or mlp_bias, which Qwen3 does not have")
    if config.qkv_bias and (config.attention_bias or config.mlp_bias):
        reasons.append("qkv_bias (Qwen2) together with attention_bias or mlp_bias, which Qwen2 does not have")
    if family == "mistral" and (config.attention_bias or config.mlp_bias):
        reasons.append("attention_bias or mlp_bias, which Mistral does not have")
    if family in ("llama", "mistral") and (config.qkv_bias or config.qk_norm):
        reasons.append(f"qkv_bias or qk_norm, which {family} does not have")
    if reasons:
        raise ExportError(
            f"Cannot export this revformer model as a standard architecture: {'; '.join(reasons)}. Exportable: a "
            f"`bdia` model (what convert.py writes, or coupling='bdia' from scratch) with `full` attention, which out "
            f"of training computes its Llama, Mistral, Qwen2 or Qwen3 source exactly."
        )


def export_config(config: RevformerConfig) -> PreTrainedConfig:
    """The source architecture's config with the revformer model's architecture values."""
    check_exportable(config)
    family = export_family(config)
    recorded = {k: v for k, v in (config.source_config or {}).items() if k not in _FILE_KEYS}
    if len(recorded.get("layer_types") or []) != config.num_hidden_layers:
        recorded.pop("layer_types", None)  # derived from num_hidden_layers again
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    fields["rope_parameters"] = dict(config.rope_parameters)
    if family in ("llama", "qwen3"):
        fields["attention_bias"] = config.attention_bias
    if family == "llama":
        fields["mlp_bias"] = config.mlp_bias
    if family == "qwen2" and config.head_dim == config.hidden_size // config.num_attention_heads:
        del fields["head_dim"]  # Qwen2's config derives it and has no field of that name
    if family in ("qwen2", "qwen3") and not config.source_config:
        fields.update(use_sliding_window=False, sliding_window=None)
    if family == "mistral" and not config.source_config:
        fields["sliding_window"] = None
    return AutoConfig.for_model(family, **{**recorded, **fields})


def exported_state_dict(model: RevformerForCausalLM, target: PreTrainedModel,
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`target`'s tensors (an instance of the source architecture, on the meta device: only its names are read) from
    the revformer model's, the inverse of `weight_map`; raises if any revformer parameter would be left behind. A tied
    head is left out, as save_pretrained does."""
    target_config = target.config
    tied = bool(target_config.tie_word_embeddings)
    mapping = weight_map(list(target.state_dict()), tied=tied)  # target name -> revformer name
    ours = dict(model.named_parameters())
    unused = set(ours) - set(mapping.values())
    if unused:
        raise ExportError(f"The {target_config.model_type} architecture has no place for revformer's "
                          f"{sorted(unused)[:8]}: exporting would lose them.")
    missing = {target: rev for target, rev in mapping.items() if rev not in ours}
    if missing:
        raise ExportError(f"revformer holds no tensor for the export's {sorted(missing)[:8]}.")
    return {
        target: ours[rev].detach().to(dtype or ours[rev].dtype)
        for target, rev in mapping.items()
        if not (tied and target == "lm_head.weight")
    }


def model_card(config: RevformerConfig, target: PreTrainedConfig, arch: str, model_dir: str | None) -> str:
    """A Hub card for the export: the architecture, where it came from, how to load it."""
    source = (config.source_config or {}).get("_name_or_path")
    run = Path(model_dir) if model_dir else None
    trained = ""
    if run is not None and (run / "eval_results.json").exists():
        results = json.loads((run / "eval_results.json").read_text())
        scores = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("eval/") and "train" not in k)
        trained = f" It was trained for {results.get('step')} steps with revformer ({scores} on its validation split)."
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [revformer, {target.model_type}, causal-lm]",
        *([f"base_model: {source}"] if source and not Path(source).exists() else []),
        "---",
        "",
        f"# A {arch}, trained with revformer",
        "",
        (f"A plain `{arch}` checkpoint ({target.num_hidden_layers} layers, hidden size {target.hidden_size}), "
         f"exported from a reversible revformer model (`bdia` coupling)"
         f"{f' converted from `{source}`' if source else ''}{f' (`{run}`)' if run else ''}.{trained} Out of training "
         "that model computes this architecture exactly, so this folder is its function, loadable without revformer "
         "or remote code."),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        "```",
        "",
    ]
    return "\n".join(lines)


def export_model(
    model: RevformerForCausalLM | str | Path,
    output_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    tokenizer: Any = None,
    push_to_hub: str | None = None,
    private: bool = True,
) -> Path:
    """Write `model` (a RevformerForCausalLM, or a folder / Hub id of one) as its source architecture's folder.

    `dtype`: the weights' dtype (default: the model's); `tokenizer`: saved beside it (default: the one in the model's
    folder, if any); `push_to_hub`: a repo id to upload the folder to (created if needed). Returns `output_dir`.
    """
    model_dir = None
    if not isinstance(model, RevformerForCausalLM):
        model_dir = str(model)
        config = AutoConfig.from_pretrained(model_dir)
        if not isinstance(config, RevformerConfig):
            raise ExportError(f"{model_dir} holds a {type(config).__name__} ({config.model_type!r}), not a revformer "
                              "model; it is already a standard checkpoint.")
        check_exportable(config)  # before loading any weights
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
            except (OSError, ValueError) as err:
                print(f"warning: no tokenizer exported ({type(err).__name__}: {err}); save one beside it.")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):  # an empty twin that names the tensors and writes config, generation config and them
        saver = AutoModelForCausalLM.from_config(export_config(model.config))
    state = exported_state_dict(model, saver, dtype)
    saver.to(next(iter(state.values())).dtype)
    saver.generation_config = model.generation_config
    out = Path(output_dir)
    # Written beside, then moved in: an interrupted export leaves no half-written folder behind.
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    saver.save_pretrained(partial, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    (partial / "README.md").write_text(model_card(model.config, saver.config, type(saver).__name__, model_dir))
    if out.exists():  # an earlier export: its files are replaced one by one
        for file in partial.iterdir():
            os.replace(file, out / file.name)
        partial.rmdir()
    else:
        partial.rename(out)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, private=private, exist_ok=True)
        api.upload_folder(repo_id=push_to_hub, folder_path=str(out),
                          commit_message=f"{saver.config.model_type} export of a revformer model")
    return out


__all__ = ["EXPORT_MIN_FRACTION_BITS", "ExportError", "check_exportable", "export_config", "export_family",
           "export_model", "exported_state_dict"]
