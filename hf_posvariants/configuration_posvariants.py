"""Configs of the posvariants family: one shared set of fields, thin subclasses that change defaults.

Field names follow transformers' Llama (`num_key_value_heads`, `rope_parameters`, `rms_norm_eps`
is spelled `norm_eps` since both norms use it) so recipes and checkpoints move between the two.
All validation lives in `validate_architecture`, which transformers runs when a config is built
and again when it is saved.
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .attention import ATTENTION_VARIANTS
from .differential_attention import DifferentialAttention  # noqa: F401  (registers "differential")
from .disentangled_attention import DisentangledAttention  # noqa: F401  (registers "disentangled")
from .position_encodings import POSITION_ENCODINGS, binary_width, selectable_position_encodings

NORM_TYPES = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLP_TYPES = ("standard", "gated")
CLASSIFIER_POOLINGS = ("first", "last", "mean")
# transformers' backends that have nowhere to put an additive score bias (they would drop it silently);
# what each encoding or attention variant runs on is declared on its registry entry (`backends`).
BIASLESS_BACKENDS = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "paged_attention")


def _choice_error(field: str, value, allowed) -> ValueError:
    return ValueError(f"{field}={value!r} is not supported; allowed values are {sorted(allowed)}.")


@strict
class PosVarConfig(PreTrainedConfig):
    r"""
    Shared configuration of every posvariants model. The family subclasses only change defaults.

    Args:
        position_encoding (`str`): one of the registered encodings (`POSITION_ENCODINGS`): "sinusoidal",
            "learned", "index", "normalized_index", "binary", "rope", "t5_bias", "alibi", "nope".
        attention_variant (`str`): one of the registered attention modules (`ATTENTION_VARIANTS`).
        is_decoder (`bool`): causal attention for the base model and the classification heads;
            `...ForCausalLM` is always causal and `...ForMaskedLM` always bidirectional.
        norm_type (`str`): "layernorm" or "rmsnorm". norm_position (`str`): "pre" or "post" (residual).
        mlp_type (`str`): "standard" (up → act → down) or "gated" (SwiGLU-style gate · up → down).
        scale_embeddings (`bool`): multiply token embeddings by sqrt(hidden_size), as the original Transformer.
        rope_parameters (`dict`): transformers' RoPE dict (rope_type, rope_theta, scaling keys).
        relative_attention_num_buckets / relative_attention_max_distance (`int`): T5 bias bucketing.
        classifier_pooling (`str`, *optional*): "first", "last" or "mean"; by default "last" for
            causal models and "first" for bidirectional ones.
        differential_head_layout (`str`): with attention_variant="differential", which heads pair up:
            "pairs" (2i, 2i+1; the paper's code) or "halves" (i, i + H/2; transformers' diffllama).
        differential_norm_affine (`bool`): a learned weight in the per-head RMSNorm of differential attention.
        differential_lambda_init (`float`, *optional*): a constant λ_init in [0, 1); None for the paper's
            depth schedule 0.8 − 0.6·exp(−0.3·(l − 1)).
        differential_lambda_std (`float`): standard deviation of the initial λ vectors.
    """

    model_type = "posvar"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    position_encoding: str = "sinusoidal"
    attention_variant: str = "standard"
    rope_parameters: RopeParameters | dict | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    is_decoder: bool = False
    norm_type: str = "layernorm"
    norm_position: str = "post"
    norm_eps: float = 1e-5
    mlp_type: str = "standard"
    attention_bias: bool = True
    mlp_bias: bool = True
    scale_embeddings: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_pooling: str | None = None
    classifier_dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    differential_head_layout: str = "pairs"
    differential_norm_affine: bool = True
    differential_lambda_init: float | None = None
    differential_lambda_std: float = 0.1

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        encoding = POSITION_ENCODINGS.get(self.position_encoding)
        if encoding is not None and not encoding.cacheable:
            self.use_cache = False  # the encoding of earlier tokens changes as the sequence grows
        super().__post_init__(**kwargs)
        # Run our checks here too, so users get a plain ValueError rather than strict's wrapper.
        self.validate_architecture()

    @property
    def position_encoding_class(self):
        return POSITION_ENCODINGS[self.position_encoding]

    def validate_architecture(self):
        """Refuse impossible settings with a message naming the field, the value and what is allowed."""
        super().validate_architecture()
        if self.position_encoding not in selectable_position_encodings():
            raise _choice_error("position_encoding", self.position_encoding, selectable_position_encodings())
        if self.attention_variant not in ATTENTION_VARIANTS:
            raise _choice_error("attention_variant", self.attention_variant, ATTENTION_VARIANTS)
        for field, allowed in (
            ("norm_type", NORM_TYPES),
            ("norm_position", NORM_POSITIONS),
            ("mlp_type", MLP_TYPES),
        ):
            if getattr(self, field) not in allowed:
                raise _choice_error(field, getattr(self, field), allowed)
        if self.classifier_pooling is not None and self.classifier_pooling not in CLASSIFIER_POOLINGS:
            raise _choice_error("classifier_pooling", self.classifier_pooling, CLASSIFIER_POOLINGS)
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be a positive integer.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}; "
                f"allowed head counts are {[h for h in range(1, self.hidden_size + 1) if self.hidden_size % h == 0]}."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads}; allowed values are "
                f"{[h for h in range(1, self.num_attention_heads + 1) if self.num_attention_heads % h == 0]}."
            )
        for field in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{field}={getattr(self, field)} must lie in [0, 1).")
        ATTENTION_VARIANTS[self.attention_variant].validate_config(self)
        self._validate_position_encoding()
        self.check_attention_backend()

    def validate_rope(self):
        """transformers' RoPE checks, only where RoPE is used (its parameters are kept for every encoding)."""
        if self.position_encoding == "rope":
            super().validate_rope()

    def _validate_position_encoding(self):
        encoding = self.position_encoding
        if encoding == "rope":
            rotary_dim = int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))
            if rotary_dim % 2 or rotary_dim == 0:
                raise ValueError(
                    f"position_encoding='rope' rotates channel pairs, so head_dim × partial_rotary_factor must be "
                    f"a positive even number; got head_dim={self.head_dim} (rotary dim {rotary_dim}). Choose "
                    "hidden_size / num_attention_heads even, or another partial_rotary_factor."
                )
        if encoding == "binary" and binary_width(self.max_position_embeddings) > self.hidden_size:
            raise ValueError(
                f"position_encoding='binary' needs {binary_width(self.max_position_embeddings)} channels for "
                f"max_position_embeddings={self.max_position_embeddings}, more than hidden_size={self.hidden_size}."
            )
        if encoding == "t5_bias":
            buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
            if buckets < 4:
                raise ValueError(f"relative_attention_num_buckets={buckets} must be at least 4 for position_encoding='t5_bias'.")
            if distance <= buckets // 2:
                raise ValueError(
                    f"relative_attention_max_distance={distance} must exceed relative_attention_num_buckets // 2 "
                    f"= {buckets // 2} for position_encoding='t5_bias' (the logarithmic buckets start there)."
                )

    def backend_requirements(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(field, value, the backends it runs on) for every component that does not run on all of them, read from
        the registry entries' `backends`."""
        variant = ATTENTION_VARIANTS[self.attention_variant]
        components = [
            ("position_encoding", self.position_encoding, self.position_encoding_class),
            ("attention_variant", self.attention_variant, variant),
        ]
        relative = variant.relative_encoding_name(self)
        if relative is not None:
            components.append(("attention_variant", self.attention_variant, POSITION_ENCODINGS[relative]))
        return [(field, value, cls.backends) for field, value, cls in components if cls.backends is not None]

    def check_attention_backend(self, implementation: str | None = None):
        """A backend that cannot carry a component (e.g. a score bias on a flash kernel) is refused, never
        allowed to drop it."""
        implementation = implementation or self._attn_implementation
        if implementation is None:
            return
        for field, value, backends in self.backend_requirements():
            if implementation not in backends:
                raise ValueError(
                    f"attn_implementation={implementation!r} cannot run {field}={value!r} (it adds a score bias the "
                    f"kernel has no place for); allowed backends are {list(backends)}."
                )


@strict
class PosVarTransformerConfig(PosVarConfig):
    r"""The original Transformer block (Vaswani et al., "Attention Is All You Need", 2017): multi-head
    attention, post-LayerNorm residuals, a GELU feed-forward, sinusoidal positions and embeddings
    scaled by sqrt(d). `norm_position="pre"` gives the pre-LN variant (Xiong et al. 2020)."""

    model_type = "posvar_transformer"


@strict
class PosVarLlamaConfig(PosVarConfig):
    r"""The LLaMA decoder block (Touvron et al., "LLaMA", 2023): RMSNorm pre-norm, SwiGLU feed-forward,
    grouped-query attention through `num_key_value_heads`, RoPE; parameter names identical to
    transformers' `LlamaForCausalLM`, so its state dict loads without renaming."""

    model_type = "posvar_llama"

    hidden_act: str = "silu"
    position_encoding: str = "rope"
    is_decoder: bool = True
    norm_type: str = "rmsnorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-6
    mlp_type: str = "gated"
    attention_bias: bool = False
    mlp_bias: bool = False
    scale_embeddings: bool = False
    tie_word_embeddings: bool = False
