"""Run configuration: a YAML file with `model`, `data` and `train` sections, plus `--section.key value` overrides.

    model:  RevformerConfig keyword arguments (the architecture; goes to the Hub with the weights)
    data:   DataConfig (corpus, tokenizer, block size)
    train:  TrainConfig (how to train; never saved into the model)

Every key is checked against the dataclass that owns it: an unknown key or a value of the wrong type raises
`ConfigError` naming the key, the expected type and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .configuration_revformer import RevformerConfig
from .corpus import DataConfig, DataError, check_block_size


class ConfigError(ValueError):
    """A run configuration that cannot be used as written."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/revformer"  # checkpoints, logs, the final model folder
    seed: int = 0
    init_from: str | None = None  # fine-tune: a `save_pretrained` folder or hub id (model and tokenizer)
    # Distillation (healing a converted model): a causal LM (hub id or folder) sharing the tokenizer; the loss becomes
    # KL(teacher || model) per predicted token, plus distill_ce_weight x cross-entropy. The teacher runs without grad.
    distill_from: str | None = None
    distill_ce_weight: float = 0.0
    # Batching: `batch_size` blocks per micro-step across all processes (split between them), so the same
    # config trains identically on 1 or N processes.
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # Sequence parallelism: each sequence split over this many processes (an all-to-all around attention; see
    # docs/training.md). processes = data-parallel size x sequence_parallel_size; batch_size splits over the former.
    sequence_parallel_size: int = 1
    max_steps: int = 1000  # optimizer steps; the learning-rate schedule spans them
    stop_after_steps: int | None = None  # end this session early (time-limited jobs); resume later
    # Optimizer and schedule
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None  # None: what `accelerate launch` configured
    compile: bool = False  # torch.compile each sublayer (the engine re-runs compiled code in backward)
    # Evaluation, logging, checkpoints
    eval_every: int = 200
    eval_batches: int | None = 50  # cap on validation batches per evaluation (None = the whole split)
    log_every: int = 10
    report_to: Literal["wandb", "none"] = "wandb"  # wandb runs offline when no API key is configured
    project_name: str = "revformer"
    run_name: str | None = None
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    save_pretrained_with_checkpoints: bool = False
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    reconstruction_check_every: int = 0  # log how exactly backward rebuilds layer inputs every N steps (0 = off)
    # Also write output_dir/export: the final model as the Llama/Mistral/Qwen2/Qwen3 folder it computes (a `bdia`
    # model with full attention; checked at start). With push_to_hub it goes to `{hub_model_id}-{model_type}`.
    export_source: bool = False
    # Hub
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True

    def __post_init__(self) -> None:
        positive = ("batch_size", "gradient_accumulation_steps", "sequence_parallel_size", "max_steps", "log_every",
                    "keep_checkpoints", "eval_every", "checkpoint_every", "eval_batches", "stop_after_steps")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}.")
        for name in ("warmup_steps", "weight_decay", "reconstruction_check_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1] (a share of learning_rate), got {self.min_lr_ratio}.")
        if self.warmup_steps >= self.max_steps:
            raise ConfigError(
                f"train.warmup_steps={self.warmup_steps} is not shorter than train.max_steps={self.max_steps}: the "
                "learning rate would never reach its peak; lower warmup_steps (e.g. 5% of max_steps)."
            )
        if self.distill_ce_weight < 0:
            raise ConfigError(f"train.distill_ce_weight must be >= 0, got {self.distill_ce_weight}.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"train.max_grad_norm must be > 0 or null (no clipping), got {self.max_grad_norm}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("train.push_to_hub is true but train.hub_model_id is not set; give 'user/model-name'.")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas needs two values in [0, 1), got {self.adam_betas}.")


@dataclass
class RunConfig:
    model: dict[str, Any]
    data: DataConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }

    def model_config(self, **fixed: Any) -> RevformerConfig:
        """The RevformerConfig of this run; `fixed` values (from the tokenizer) win over the YAML."""
        try:
            return RevformerConfig(**{**self.model, **fixed})
        except Exception as err:  # strict dataclass validation wraps the ValueError; show the cause plainly
            raise ConfigError(f"Invalid model section: {err}") from err

    def validate(self) -> None:
        """Check the sections against each other before any tokenizing or packing starts (cheap, no files read).

        A fine-tuning run's model section only overrides the saved config, which the trainer checks on load.
        """
        if not self.train.init_from:
            placeholder = {"byte": 259, "bpe": self.data.vocab_size}.get(self.data.tokenizer, 2**15)
            config = self.model_config(vocab_size=placeholder)  # the tokenizer fixes the real size later
            try:
                check_block_size(self.data.block_size, config.max_position_embeddings)
            except DataError as err:
                raise ConfigError(f"data.block_size vs model.max_position_embeddings: {err}") from None
        sp = self.train.sequence_parallel_size
        if sp > 1:
            self._check_sequence_parallel(sp, None if self.train.init_from else config)

    def _check_sequence_parallel(self, sp: int, config: RevformerConfig | None) -> None:
        """What sequence parallelism over `sp` processes needs: equal slices of every block, heads that split
        between the processes (checked on load for a fine-tuned model), and no teacher (not supported)."""
        from .sequence_parallel import check_heads

        if self.data.block_size % sp:
            raise ConfigError(f"data.block_size={self.data.block_size} is not divisible by "
                              f"train.sequence_parallel_size={sp}: each process of a sequence-parallel group holds "
                              f"block_size / {sp} tokens; use a multiple of {sp}.")
        if self.train.distill_from:
            raise ConfigError("train.distill_from is not supported with train.sequence_parallel_size > 1; distill "
                              "with sequence_parallel_size 1.")
        if config is not None:
            try:
                check_heads(config.num_attention_heads, config.num_key_value_heads, sp)
            except ValueError as err:
                raise ConfigError(str(err)) from None


def _model_fields() -> dict[str, Any]:
    import torch  # PreTrainedConfig annotates `dtype` with torch types

    hints = typing.get_type_hints(RevformerConfig, localns={"torch": torch})
    names = {f.name for f in dataclasses.fields(RevformerConfig)}
    return {name: hints[name] for name in names if not name.startswith("_") and name in hints}


def _section_fields(section: str) -> dict[str, Any]:
    if section == "model":
        return _model_fields()
    cls = {"data": DataConfig, "train": TrainConfig}[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


SECTIONS = ("model", "data", "train")


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a field annotation (int fits float; bool never fits int)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _describe(annotation: Any) -> str:
    return str(annotation).replace("typing.", "") if not isinstance(annotation, type) else annotation.__name__


def _check(section: str, key: str, value: Any) -> Any:
    fields = _section_fields(section)
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" Did you mean '{section}.{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown key '{section}.{key}'.{hint} Valid keys: {', '.join(sorted(fields))}.")
    if isinstance(value, int) and not isinstance(value, bool) and _matches(float(value), fields[key]):
        value = value if _matches(value, fields[key]) else float(value)
    if not _matches(value, fields[key]):
        raise ConfigError(
            f"'{section}.{key}' must be {_describe(fields[key])}, got {value!r} ({type(value).__name__})."
        )
    return value


def _admits(annotation: Any, kind: type) -> bool:
    """Whether a field annotation accepts values of `kind` (a Literal of strings counts as str)."""
    if annotation is Any or annotation is kind:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_admits(arg, kind) for arg in typing.get_args(annotation))
    if origin is Literal:
        return any(isinstance(arg, kind) and not isinstance(arg, bool) for arg in typing.get_args(annotation))
    return kind is float and annotation is float


def _parse_value(text: str, annotation: Any = Any) -> Any:
    """The typed value of `--key text` for a field annotated `annotation`.

    YAML scalars: 3 -> int, 3e-4 -> float, true -> bool, null -> None, [a, b] -> list. A field that takes a string
    keeps the text as typed (`--train.output_dir nan`, `yes`, `1e3`, `null`) unless the text is a value the field
    also accepts in another type (a list, a number for an `int | str` field, null for an optional field).
    """
    value = yaml.safe_load(text)
    if isinstance(value, str) and not _admits(annotation, str):
        try:  # YAML 1.1 reads 3e-4 as a string; for a numeric field users mean a float
            return float(value)
        except ValueError:
            return value
    if annotation is Any or not _admits(annotation, str) or isinstance(value, str):
        return value
    if value is None:
        return None if _admits(annotation, type(None)) else text
    if isinstance(value, (list, dict)) or _matches(value, _without_str(annotation)):
        return value
    return text


def _without_str(annotation: Any) -> Any:
    """The annotation with its `str` member removed (what a non-string value must fit)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(annotation) if arg is not str]
        return typing.Union[tuple(rest)] if rest else type(None)
    return type(None) if annotation is str else annotation


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """`--section.key value` (or `--section.key=value`) pairs; a bare `--key` must belong to exactly one section."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"Expected an option like --train.max_steps 100, got {arg!r}.")
        if "=" in arg:
            name, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"Option {arg} needs a value.")
            name, text = arg[2:], args[i + 1]
            i += 2
        if "." in name:
            section, key = name.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"Unknown section in --{name}; sections are {', '.join(SECTIONS)}.")
        else:
            owners = [s for s in SECTIONS if name in _section_fields(s)]
            if len(owners) != 1:
                raise ConfigError(
                    f"--{name} is ambiguous or unknown; write it as --<section>.{name} with a section of {SECTIONS}."
                )
            section, key = owners[0], name
        fields = _section_fields(section)
        out[section][key] = _check(section, key, _parse_value(text, fields.get(key, Any)))
    return out


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run YAML, apply overrides, validate every key and type."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist; see configs/ for the recipes (e.g. configs/tiny.yaml).")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must be a mapping with sections {SECTIONS}.")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown section(s) {unknown} in {path}; sections are {', '.join(SECTIONS)}.")
    sections: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"Section '{section}' in {path} must be a mapping of key: value.")
        sections[section] = {key: _check(section, key, value) for key, value in values.items()}
    for section, values in parse_overrides(overrides or []).items():
        sections[section].update(values)
    try:
        data = DataConfig(**sections["data"])
        train = TrainConfig(**sections["train"])
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    run = RunConfig(model=sections["model"], data=data, train=train)
    run.validate()
    return run


def config_help() -> str:
    """Every section and key with its type and default, generated from the dataclasses (for `--help`)."""
    lines = ["sections and keys (YAML `section: {key: value}` or `--section.key value`; default in brackets):"]
    model_defaults = {f.name: f.default for f in dataclasses.fields(RevformerConfig)}
    for section in SECTIONS:
        lines.append(f"  {section}:" + ("  (RevformerConfig; vocab_size and special token ids come from the tokenizer)"
                                        if section == "model" else ""))
        fields = _section_fields(section)
        if section == "model":
            defaults = model_defaults
            # Declaration order; PretrainedConfig's generic bookkeeping fields are accepted but not listed.
            generic = {"transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
                       "is_encoder_decoder", "id2label", "label2id", "problem_type"}
            names = [n for n in model_defaults if n in fields and n not in generic]
        else:
            cls = {"data": DataConfig, "train": TrainConfig}[section]
            defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                        for f in dataclasses.fields(cls)}
            names = list(fields)
        for name in names:
            lines.append(f"    --{section}.{name} {_describe(fields[name])} [{defaults.get(name)!r}]")
    return "\n".join(lines)


def save_run_config(run: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
