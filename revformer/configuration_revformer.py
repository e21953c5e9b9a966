"""RevformerConfig: the architecture of a reversible decoder-only Transformer (what rebuilds the weights)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

ATTENTION_KINDS = ("full", "local", "lsh")
STREAM_DTYPES = ("float32", "fixed_point")
COUPLINGS = ("sublayer", "bdia")


@strict(accept_kwargs=True)
class RevformerConfig(PreTrainedConfig):
    r"""Configuration of a [`RevformerForCausalLM`].

    Canonical Hugging Face names (`rope_parameters` as in Llama: e.g. `{"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 1024}` with `max_position_embeddings=4096` runs a model trained at 1K tokens
    at 4K), plus:
        reversible (`bool`): train through the reversible engine (activation memory independent of depth). `False`
            runs the very same blocks as an ordinary residual network with standard autograd.
        attention_layers (`list[str]` or `str`): attention kernel per layer, each one of `full`, `local`, `lsh`; a
            single string applies to every layer; `None` means `full` everywhere.
        local_chunk_length, local_num_chunks_before: `local` attention window (a chunk attends to itself and that
            many previous chunks; chunks are counted in real tokens, so padding does not move them).
        lsh_num_buckets, lsh_num_hashes, lsh_chunk_length: `lsh` attention: each hash round puts tokens into
            `lsh_num_buckets` buckets, and a token attends to its `lsh_chunk_length` most recent earlier tokens of
            its bucket in any of `lsh_num_hashes` rounds (and to itself when nothing else).
        lsh_seed (`int`): seed of the fixed LSH rotations used in eval mode and generation (one per layer, derived
            from it); training draws fresh rotations every forward.
        chunk_size_feed_forward (`int`, defaults to 1024): the feed-forward runs this many tokens at a time, so its
            (tokens, intermediate_size) activations never exist for a whole long sequence, in forward or backward,
            and so does the attention's position-wise part (normalisation, projections, rotary); shorter sequences
            run in one piece (0 = never chunk). Results do not depend on it.
        chunk_size_attention (`int`, defaults to 256): causal `full` attention (sdpa or eager) takes this many
            queries at a time against the keys before them, in forward and backward, so a long sequence's queries,
            attention outputs and their gradients never exist whole, only its keys and values (0 = whole sequence). Runs without a cache, attention dropout or sequence parallelism; results agree with
            the whole-sequence kernel to float rounding.
        loss_chunk_size (`int`, defaults to 256): with labels for more positions (batch x length) than this, the LM
            head and cross-entropy run this many positions at a time and full logits never exist (0 = never chunk).
        stream_dtype (`str`): `float32` residual streams, or `fixed_point`: streams on a grid of
            2^-stream_fraction_bits (integer multiples held exactly in float64), which makes the coupling exactly
            invertible whatever precision F and G compute in.
        coupling (`str`): how layers join the two streams. `sublayer` (default): every layer is a reversible block
            `y1 = x1 + A(x2)`, `y2 = x2 + M(y1)` with A its attention and M its feed-forward; the hidden state is
            the newest stream, `y2` of the last block. `bdia` (what `convert.py` produces): every layer is one whole
            pre-norm Transformer block `f(p) = A(p) + M(p + A(p))`, and the layers alternate between the streams,
            `p[l+1] = gamma p[l-1] + (1 - gamma) p[l] + (1 + gamma) f_l(p[l])` from `p[-1] = p[0] = embedding`
            (BDIA, arXiv 2407.09093), with gamma = +-`bdia_gamma` drawn per sequence and layer in training and
            gamma = 0 otherwise, so that evaluation, generation and the KV cache compute a standard pre-norm
            Transformer exactly (a converted model is its source until trained). The inverse divides by gamma, so
            reversible training wants `stream_dtype="fixed_point"`, where it is exact at the price of
            log2(1/bdia_gamma) bits per stream element per layer, kept packed beside the top streams.
        bdia_gamma (`float`, defaults to 0.5): the magnitude of the `bdia` coupling's gamma, a power of two 2^-m
            (m in 1..8). 0.5 is the BDIA paper's value for training from scratch; `convert.py` uses 1/16, with which
            training runs a network close to the pretrained one (docs/conversion.md).
        num_key_value_heads (`int`, *optional*): key/value heads for grouped-query attention (each serves
            `num_attention_heads / num_key_value_heads` query heads, and the KV cache holds only these); `None` means
            as many as query heads.
        head_dim (`int`, *optional*): width of each attention head; `None` means `hidden_size / num_attention_heads`.
        attention_bias (`bool`): biases on the query, key, value and output projections (Llama's option).
        qkv_bias (`bool`): biases on the query, key and value projections only (Qwen2).
        mlp_bias (`bool`): biases on the feed-forward's gate, up and down projections (Llama's option).
        qk_norm (`bool`): RMSNorm over each head's queries and keys before rotary embedding (Qwen3).
        source_config (`dict`, *optional*): the config of the model `convert.py` converted (its non-default values,
            `model_type` and name), so that `export.py` writes that architecture back with the source's own values.

    Example:
    ```python
    >>> from revformer import RevformerConfig, RevformerForCausalLM
    >>> model = RevformerForCausalLM(RevformerConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4))
    ```
    """

    model_type = "revformer"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 8192
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    # transformers' RoPE parameters (`rope_type` default/linear/dynamic/yarn/llama3 + `rope_theta`, `factor`, ...);
    # configs saved with a top-level `rope_theta` (or `rope_scaling`) are converted on load.
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    reversible: bool = True
    attention_layers: list[str] | str | None = None
    local_chunk_length: int = 128
    local_num_chunks_before: int = 1
    lsh_num_buckets: int = 32
    lsh_num_hashes: int = 2
    lsh_chunk_length: int = 64
    lsh_seed: int = 0
    # Memory options, on by default: they leave short sequences alone and cost little on long ones (README).
    chunk_size_feed_forward: int = 1024
    chunk_size_attention: int = 256
    loss_chunk_size: int = 256
    stream_dtype: str = "float32"
    stream_fraction_bits: int = 32
    coupling: str = "sublayer"
    bdia_gamma: float = 0.5
    # What pretrained Llama-family models need (convert.py); as useful for models trained from scratch.
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    source_config: dict | None = None

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """`from_pretrained(folder, num_hidden_layers=..., ...)`: overrides of architecture fields join the saved
        values *before* the config is built, so that what is derived from them (the per-layer attention list,
        `head_dim`, `num_key_value_heads`) follows and the whole config is validated, instead of being set on a
        built config and left inconsistent. A `rope_parameters` dict without `rope_theta` keeps the saved base."""
        config_dict = dict(config_dict)
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.__dataclass_fields__}
        saved_layers = config_dict.get("attention_layers")
        if "num_hidden_layers" in given and "attention_layers" not in given and isinstance(saved_layers, list):
            if len(saved_layers) != given["num_hidden_layers"]:
                if len(set(saved_layers)) > 1:
                    raise ValueError(
                        f"num_hidden_layers={given['num_hidden_layers']} differs from the saved model's "
                        f"{len(saved_layers)} layers, whose attention kinds differ ({saved_layers}); pass "
                        "attention_layers too (a list of one kind per layer, or one kind for all)."
                    )
                given["attention_layers"] = saved_layers[0]
        heads = given.get("num_attention_heads", config_dict.get("num_attention_heads"))
        width = given.get("hidden_size", config_dict.get("hidden_size"))
        saved_heads, saved_width = config_dict.get("num_attention_heads"), config_dict.get("hidden_size")
        derived = saved_heads and saved_width and config_dict.get("head_dim") == saved_width // saved_heads
        if "head_dim" not in given and derived and (heads, width) != (saved_heads, saved_width):
            config_dict.pop("head_dim")  # it was hidden_size / heads: derive it again from the new values
        if "num_key_value_heads" not in given and config_dict.get("num_key_value_heads") == saved_heads != heads:
            config_dict.pop("num_key_value_heads")  # it was "no grouping": keep it that way
        rope = given.get("rope_parameters")
        if isinstance(rope, dict) and rope.get("rope_theta") is None:
            saved = config_dict.get("rope_parameters") or {}
            theta = saved.get("rope_theta", config_dict.get("rope_theta"))
            if theta is not None:  # a new scaling replaces the dict; the base belongs to the trained model
                given["rope_parameters"] = {**rope, "rope_theta": theta}
        config_dict.update(given)
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        if self.attention_layers is None:
            self.attention_layers = "full"
        if isinstance(self.attention_layers, str):
            self.attention_layers = [self.attention_layers] * self.num_hidden_layers
        else:
            self.attention_layers = list(self.attention_layers)
        if self.head_dim is None:
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"RevformerConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}); pick a head count that divides it, or set head_dim."
                )
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    @property
    def bdia_keep_bits(self) -> int | None:
        """m of bdia_gamma = 2^-m: the bits per stream element a fixed-point `bdia` join keeps aside (None if bdia_gamma
        is no such power of two)."""
        for m in range(1, 9):
            if self.bdia_gamma == 2.0**-m:
                return m
        return None

    def validate_architecture(self):
        """Part of `@strict` validation: one clear error per inconsistent value, naming the fix."""
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "local_chunk_length", "lsh_num_hashes", "lsh_chunk_length", "head_dim",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"RevformerConfig.{name} must be a positive integer, got {getattr(self, name)}.")
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"Rotary embeddings need an even head dimension, got head_dim = {self.head_dim}; change head_dim "
                f"(or hidden_size / num_attention_heads)."
            )
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"RevformerConfig.num_key_value_heads ({self.num_key_value_heads}) must be positive and divide "
                f"num_attention_heads ({self.num_attention_heads}): each key/value head serves a whole group of "
                f"query heads."
            )
        if self.coupling not in COUPLINGS:
            raise ValueError(f"RevformerConfig.coupling must be one of {COUPLINGS}, got {self.coupling!r}.")
        if self.bdia_keep_bits is None:
            raise ValueError(
                f"RevformerConfig.bdia_gamma must be a power of two 2^-m with m in 1..8 (0.5, 0.25, ...), so that "
                f"fixed-point streams divide by it exactly; got {self.bdia_gamma}."
            )
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"RevformerConfig.{name} must be in [0, 1), got {getattr(self, name)}.")
        if len(self.attention_layers) != self.num_hidden_layers:
            raise ValueError(
                f"RevformerConfig.attention_layers has {len(self.attention_layers)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; give one kind per layer or a single string for all layers."
            )
        unknown = sorted(set(self.attention_layers) - set(ATTENTION_KINDS))
        if unknown:
            raise ValueError(f"Unknown attention kind(s) {unknown} in attention_layers; choose from {ATTENTION_KINDS}.")
        if self.lsh_num_buckets < 1 or (self.lsh_num_buckets > 1 and self.lsh_num_buckets % 2):
            raise ValueError(f"RevformerConfig.lsh_num_buckets must be 1 or an even number, got {self.lsh_num_buckets}.")
        if self.local_num_chunks_before < 0:
            raise ValueError("RevformerConfig.local_num_chunks_before must be >= 0.")
        if min(self.chunk_size_feed_forward, self.chunk_size_attention, self.loss_chunk_size) < 0:
            raise ValueError("Chunk sizes (chunk_size_feed_forward, chunk_size_attention, loss_chunk_size) must be "
                             ">= 0 (0 = no chunking).")
        if self.stream_dtype not in STREAM_DTYPES:
            raise ValueError(f"RevformerConfig.stream_dtype must be one of {STREAM_DTYPES}, got {self.stream_dtype!r}.")
        if not 8 <= self.stream_fraction_bits <= 40:
            raise ValueError(
                f"RevformerConfig.stream_fraction_bits must be in [8, 40], got {self.stream_fraction_bits}: fixed-point "
                f"streams hold |x| < 2^(53 - stream_fraction_bits), so more bits leave too little range (40 -> 8192)."
            )
        if self.hidden_act != "silu":
            raise ValueError(f"RevformerConfig.hidden_act: only 'silu' (SwiGLU) is implemented, got {self.hidden_act!r}.")


__all__ = ["RevformerConfig"]
