"""Configs of the posvariants family: one shared set of fields, thin subclasses that change defaults.

Field names follow transformers' Llama (`num_key_value_heads`, `rope_parameters`, `rms_norm_eps`
is spelled `norm_eps` since both norms use it) so recipes and checkpoints move between the two.
`validate_architecture`, which transformers runs when a config is built and again when it is saved, checks the
shared fields and asks each component in use (encoding, attention variant) to check the fields it owns
(`validate_config`, `config_fields`); every refusal is a plain ValueError naming the field, the value and what
is allowed.
This file imports only torch, transformers and huggingface_hub (a dependency of transformers): it travels
with remote-code checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

from .components import ATTENTION_VARIANTS, POSITION_ENCODINGS, position_ids_encodings, selectable_position_encodings
from .validation import choice_error, require_number

NORM_TYPES = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLP_TYPES = ("standard", "gated")
CLASSIFIER_POOLINGS = ("first", "last", "mean")
# Tensor parallelism gives each rank a slice of the heads through the projections; a shared position bias follows
# them where its encoding declares which of its tables are per head (`per_head_tables`), and the base model reads those
# at the rank's heads. DeBERTa's relative embeddings are projected per head by its own attention: refused.
# Differential attention splits: its λ and norm are shared by all heads, and "pairs" keeps each pair on one rank.
TENSOR_PARALLEL_VARIANTS = ("standard", "differential")


def tensor_parallel_encodings() -> list[str]:
    """The selectable encodings whose per-head state follows a tensor-parallel rank's heads: every kind but a bias that
    does not declare its per-head tables."""
    return [
        name for name in selectable_position_encodings()
        if POSITION_ENCODINGS[name].kind != "bias" or POSITION_ENCODINGS[name].per_head_tables is not None
    ]  # fmt: skip


# Context parallelism (torch's ring attention, which accelerate's `cp_size` runs) splits queries, keys and values over
# ranks and intercepts SDPA's causal kernel alone, without a mask: the attention must call SDPA with `is_causal` and
# nothing of size (queries × keys). Differential attention does so on GPUs (a call per value half); DeBERTa adds
# position terms computed over all keys.
CONTEXT_PARALLEL_VARIANTS = ("standard", "differential")
CONTEXT_PARALLEL_BACKENDS = ("sdpa",)


ROPE_TYPES = ("default", *ROPE_INIT_FUNCTIONS)
# Scalar keys of `rope_parameters`: what each must satisfy to give finite, meaningful frequencies.
ROPE_NUMBER_RULES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "rope_theta": ("> 0", lambda value: value > 0),
    "factor": (">= 1 (transformers' scaling functions assume it)", lambda value: value >= 1),
    "partial_rotary_factor": ("in (0, 1]", lambda value: 0 < value <= 1),
    "attention_factor": ("> 0", lambda value: value > 0),
    "low_freq_factor": ("> 0", lambda value: value > 0),
    "high_freq_factor": ("> 0", lambda value: value > 0),
    "beta_fast": ("> 0", lambda value: value > 0),
    "beta_slow": ("> 0", lambda value: value > 0),
    "mscale": (">= 0", lambda value: value >= 0),
    "mscale_all_dim": (">= 0", lambda value: value >= 0),
}


def _matches_annotation(value, annotation) -> bool:
    """Whether `value` has a type the annotation allows; an int is a valid float, a bool is not an int."""
    if annotation is type(None):
        return value is None
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        return any(_matches_annotation(value, option) for option in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches_annotation(entry, item) for entry in value)
    if typing.is_typeddict(annotation):
        return isinstance(value, dict)
    if isinstance(value, bool) and annotation is not bool:
        return False
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, annotation)


@functools.cache
def _declared_fields(config_class: type) -> dict[str, tuple[object, str]]:
    """Field → (resolved annotation, annotation as written) for the fields the posvariants configs declare.

    `@strict` cannot check these types itself: under `from __future__ import annotations` it sees strings."""
    field_names = {field.name for field in dataclasses.fields(config_class)}
    fields = {}
    for klass in reversed(config_class.__mro__):
        if isinstance(klass, type) and issubclass(klass, PosVarConfig):
            annotations = klass.__dict__.get("__annotations__", {})
            written = {name: text for name, text in annotations.items() if name in field_names}
            # Resolved in the class's own module only: the base config's annotations name torch lazily.
            owner = types.SimpleNamespace(__annotations__=written)
            resolved = typing.get_type_hints(owner, globalns=vars(sys.modules[klass.__module__]))
            fields.update({name: (resolved[name], text) for name, text in written.items()})
    return fields


@strict
class PosVarConfig(PreTrainedConfig):
    r"""
    Shared configuration of every posvariants model. The family subclasses only change defaults.

    Args:
        position_encoding (`str`): one of the registered encodings (`POSITION_ENCODINGS`): "sinusoidal",
            "learned", "index", "normalized_index", "binary", "rope", "xpos", "t5_bias", "alibi", "kerple",
            "dynamic_bias", "fire", "cope", "nope".
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
        kerple_variant (`str`): the kernel of position_encoding="kerple": "log" (−r1·log(1 + r2·|i − j|)) or
            "power" (−r1·|i − j|^r2).
        dynamic_bias_hidden_size / dynamic_bias_layers (`int`): width and number of SiLU layers of the MLP of
            position_encoding="dynamic_bias".
        fire_mlp_width (`int`): hidden units of FIRE's MLP (the paper's 32). fire_threshold (`float`): the initial
            threshold L of FIRE's progressive interpolation ψ(i − j) / ψ(max(L, i)) (the paper's 512).
        xpos_scale_base (`float`): B in xPos's per-channel decay ζ^((n − m)/B) (the paper's 512).
        cope_max_positions (`int`): number of CoPE's learned position embeddings per layer; gated counts beyond
            it share the last one.
        layer_position_encodings (`list[str]`, *optional*): a per-layer schedule: layer i uses entry
            i mod len(list), e.g. ["rope", "rope", "rope", "nope"] (Llama 4) or ["alibi", "nope"] with two layers.
            Entries act inside attention (rotary, bias, contextual or no encoding); the length must divide
            num_hidden_layers. `position_encoding` then is either an absolute encoding added to the embeddings (or
            "nope") or one of the scheduled encodings. Each distinct encoding is computed once per forward.
    """

    model_type = "posvar"
    keys_to_ignore_at_inference = ["cache"]
    # Tensor and pipeline parallel plans under transformers' Llama names (`from_pretrained(..., tp_plan="auto")`,
    # `DistributedConfig`); `check_tensor_parallel` refuses the configurations the head split cannot carry.
    base_model_tp_plan: ClassVar[dict[str, str]] = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan: ClassVar[dict[str, tuple[list[str], list[str]]]] = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }
    # A fragment of a base-model weight name → the field that decides whether the weight exists (named when a
    # checkpoint's weights do not fit its config).
    weight_fields: ClassVar[dict[str, str]] = {"position_encoding.": "position_encoding", "self_attn.": "attention_variant"}

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
    kerple_variant: str = "log"
    dynamic_bias_hidden_size: int = 64
    dynamic_bias_layers: int = 2
    fire_mlp_width: int = 32
    fire_threshold: float = 512.0
    xpos_scale_base: float = 512.0
    cope_max_positions: int = 64
    layer_position_encodings: list[str] | None = None

    def __post_init__(self, **kwargs):
        self._validate_field_types()  # before the derivations below compute with the values
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        encodings = [POSITION_ENCODINGS.get(name) for name in self.position_encodings_in_use]
        if any(encoding is not None and not encoding.cacheable for encoding in encodings):
            self.use_cache = False  # the encoding of earlier tokens changes as the sequence grows
        super().__post_init__(**kwargs)
        # Run our checks here too, so users get a plain ValueError rather than strict's wrapper.
        self.validate_architecture()
        self.validate_output_attentions()

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Checked before saving as when built (a field may have been assigned since), as a plain ValueError."""
        self.validate_architecture()
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def position_encoding_class(self):
        return POSITION_ENCODINGS[self.position_encoding]

    def layer_position_encoding(self, layer_idx: int) -> str:
        """The encoding layer `layer_idx` uses: its entry of `layer_position_encodings`, else `position_encoding`."""
        schedule = self.layer_position_encodings
        return schedule[layer_idx % len(schedule)] if schedule else self.position_encoding

    @property
    def position_encodings_in_use(self) -> list[str]:
        """`position_encoding` and every scheduled encoding, each once, in order of first use."""
        return list(dict.fromkeys([self.position_encoding, *(self.layer_position_encodings or [])]))

    def validate_architecture(self):
        """Refuse impossible settings with a message naming the field, the value and what is allowed."""
        super().validate_architecture()
        self._validate_field_types()
        self._validate_choices()
        self._validate_sizes()
        self._validate_numbers()
        self._validate_pad_token_id()
        ATTENTION_VARIANTS[self.attention_variant].validate_config(self)
        self._validate_layer_schedule()
        for _, _, encoding in self.position_components():  # a field only an unused encoding reads is not checked
            encoding.validate_config(self)
        self.validate_rope()
        self.check_attention_backend()

    def _validate_choices(self):
        """String fields that select a registered component."""
        for field, allowed in (
            ("position_encoding", selectable_position_encodings()),
            ("attention_variant", ATTENTION_VARIANTS),
            ("norm_type", NORM_TYPES),
            ("norm_position", NORM_POSITIONS),
            ("mlp_type", MLP_TYPES),
            ("hidden_act", ACT2FN),
        ):
            if getattr(self, field) not in allowed:
                raise choice_error(field, getattr(self, field), allowed)
        if self.classifier_pooling is not None and self.classifier_pooling not in CLASSIFIER_POOLINGS:
            raise choice_error("classifier_pooling", self.classifier_pooling, CLASSIFIER_POOLINGS)

    def _validate_sizes(self):
        """Positive sizes, and head counts that divide what they split."""
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "intermediate_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} is not allowed; allowed values are integers >= 1.")
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

    def _validate_field_types(self):
        """Every declared field holds a value of its annotated type (JSON and sweeps hand over "64" or 2.0)."""
        for field, (annotation, written) in _declared_fields(type(self)).items():
            value = getattr(self, field)
            if not _matches_annotation(value, annotation):
                raise ValueError(
                    f"{field}={value!r} has type {type(value).__name__}; allowed types are {written}."
                )

    def _validate_numbers(self):
        """Real-valued fields that would turn into NaN or nonsense weights."""
        for field in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            require_number(field, getattr(self, field), "in [0, 1)", lambda value: 0 <= value < 1)
        require_number("norm_eps", self.norm_eps, "> 0", lambda value: value > 0)
        require_number("initializer_range", self.initializer_range, ">= 0", lambda value: value >= 0)
        require_number("differential_lambda_std", self.differential_lambda_std, ">= 0", lambda value: value >= 0)

    def _validate_pad_token_id(self):
        """The padding row of the embedding table must exist (transformers only warns; torch then fails or
        silently counts -1 from the end)."""
        pad = self.pad_token_id
        if pad is not None and not 0 <= pad < self.vocab_size:
            raise ValueError(
                f"pad_token_id={pad} is outside the vocabulary; allowed values are None or 0..{self.vocab_size - 1} "
                f"(vocab_size={self.vocab_size})."
            )

    def validate_rope(self):
        """transformers' RoPE checks plus the values that give NaN or a crash, only where RoPE is used (its
        parameters are kept for every encoding). transformers' own checks raise KeyError for a missing key and
        only warn about bad values: both become a ValueError naming the key."""
        if "rope" not in self.position_encodings_in_use:
            return
        rope = self.rope_parameters
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise choice_error("rope_parameters['rope_type']", rope_type, ROPE_TYPES)
        for key, (allowed, within) in ROPE_NUMBER_RULES.items():
            if rope.get(key) is not None:
                require_number(f"rope_parameters['{key}']", rope[key], allowed, within)
        rotary_dim = int(self.head_dim * rope.get("partial_rotary_factor", 1.0))
        if rotary_dim % 2 or rotary_dim == 0:
            raise ValueError(
                f"position_encoding='rope' rotates channel pairs, so head_dim × partial_rotary_factor must be "
                f"a positive even number; got head_dim={self.head_dim} (rotary dim {rotary_dim}). Choose "
                "hidden_size / num_attention_heads even, or another partial_rotary_factor."
            )
        if rope_type == "dynamic" and rotary_dim < 4:
            raise ValueError(
                f"rope_parameters['rope_type']='dynamic' raises theta to the power rotary_dim / (rotary_dim - 2), so "
                f"the rotary dim (head_dim × partial_rotary_factor) must be at least 4; got {rotary_dim} from "
                f"head_dim={self.head_dim}."
            )
        self._validate_rope_lengths(rope, rotary_dim)
        try:
            super().validate_rope()
        except KeyError as error:
            raise ValueError(f"rope_parameters={rope!r} is incomplete: {error.args[0]}") from None
        if rope_type == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
            raise ValueError(
                f"rope_parameters['high_freq_factor']={rope['high_freq_factor']} must exceed "
                f"rope_parameters['low_freq_factor']={rope['low_freq_factor']} (their difference is a divisor)."
            )

    @staticmethod
    def _validate_rope_lengths(rope: dict, rotary_dim: int) -> None:
        """The pre-training length (a divisor in yarn) and longrope's per-frequency factors (one per channel pair)."""
        original = rope.get("original_max_position_embeddings")
        if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
            raise ValueError(
                f"rope_parameters['original_max_position_embeddings']={original!r} is not allowed; allowed values "
                "are integers >= 1."
            )
        for key in ("short_factor", "long_factor"):
            factors = rope.get(key)
            if factors is None:
                continue
            if not isinstance(factors, list) or len(factors) != rotary_dim // 2:
                raise ValueError(
                    f"rope_parameters['{key}']={factors!r} is not allowed; allowed values are lists of "
                    f"rotary_dim // 2 = {rotary_dim // 2} numbers > 0 (one per rotated channel pair)."
                )
            for index, factor in enumerate(factors):
                require_number(f"rope_parameters['{key}'][{index}]", factor, "> 0", lambda value: value > 0)

    def _validate_layer_schedule(self):
        schedule = self.layer_position_encodings
        if schedule is None:
            return
        per_layer = [name for name in selectable_position_encodings() if POSITION_ENCODINGS[name].kind != "absolute"]
        if not schedule or any(name not in per_layer for name in schedule):
            raise ValueError(
                f"layer_position_encodings={schedule!r} must be a non-empty list of encodings that act inside "
                f"attention; allowed entries are {sorted(per_layer)}."
            )
        if self.num_hidden_layers % len(schedule):
            raise ValueError(
                f"layer_position_encodings has {len(schedule)} entries, which must divide num_hidden_layers="
                f"{self.num_hidden_layers} (the list repeats over the layers)."
            )
        main_kind = self.position_encoding_class.kind
        if main_kind not in ("absolute", "none") and self.position_encoding not in schedule:
            raise ValueError(
                f"position_encoding={self.position_encoding!r} is not in layer_position_encodings={schedule!r}; with a "
                f"schedule it must be an absolute encoding, 'nope', or one of {sorted(set(schedule))}."
            )

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Refuse, naming the field and value, a configuration whose heads cannot be split over `tp_size` ranks."""
        if self.attention_variant not in TENSOR_PARALLEL_VARIANTS:
            raise ValueError(
                f"Tensor parallelism (tp_size={tp_size}) is not supported for attention_variant="
                f"{self.attention_variant!r}: its relative-position projections are per head and would not follow "
                f"each rank's heads; allowed values are {list(TENSOR_PARALLEL_VARIANTS)} (or tp_size=1)."
            )
        if self.attention_variant == "differential" and self.differential_head_layout != "pairs":
            raise ValueError(
                f"Tensor parallelism (tp_size={tp_size}) is not supported for differential_head_layout="
                f"{self.differential_head_layout!r}: it pairs head i with head i + H/2, which land on different "
                "ranks; allowed value is 'pairs' (heads 2i, 2i+1 stay together)."
            )
        scheduled = [("layer_position_encodings", name) for name in self.layer_position_encodings or []]
        for field, name in [("position_encoding", self.position_encoding), *scheduled]:
            encoding = POSITION_ENCODINGS[name]
            if encoding.kind == "bias" and encoding.per_head_tables is None:
                raise ValueError(
                    f"Tensor parallelism (tp_size={tp_size}) is not supported for {field}={name!r}: its bias does not "
                    "declare which of its tables hold one entry per head (`per_head_tables`), so they could not follow "
                    f"each rank's heads; allowed encodings are {sorted(tensor_parallel_encodings())} (or tp_size=1)."
                )
        # Differential attention keeps pairs of query and of key/value heads on one rank.
        differential = self.attention_variant == "differential"
        per_rank = {"num_attention_heads": 2, "num_key_value_heads": 2} if differential else {}
        for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            multiple = tp_size * per_rank.get(field, 1)
            if getattr(self, field) % multiple:
                raise ValueError(
                    f"Tensor parallelism (tp_size={tp_size}) needs {field}={getattr(self, field)} to be a multiple of "
                    f"{multiple}{' (head pairs per rank)' if multiple != tp_size else ''}; choose a tp_size that "
                    "divides it."
                )

    def check_context_parallel(self, cp_size: int, is_causal: bool, attn_implementation: str | None = None) -> None:
        """Refuse, naming the field and value, a configuration that cannot run with its sequence split over `cp_size`
        ranks (torch's context parallel, accelerate's `cp_size`): a bidirectional model (`is_causal` False), a backend
        (`attn_implementation`, by default the config's) other than SDPA, or an encoding computed across keys (a bias
        folded into a (B, H, Q, K) mask, CoPE's counts, a length-normalised index, DeBERTa's relative terms)."""
        prefix = f"Context parallelism (cp_size={cp_size})"
        attn_implementation = attn_implementation or self._attn_implementation
        if not is_causal:
            raise ValueError(
                f"{prefix} runs causal attention only (its load balancing and SDPA's is_causal): this model attends "
                "bidirectionally (a masked-LM or classification head, or is_decoder=False); allowed are causal "
                "language models (AutoModelForCausalLM), or cp_size=1."
            )
        if self.attention_variant not in CONTEXT_PARALLEL_VARIANTS:
            raise ValueError(
                f"{prefix} is not supported for attention_variant={self.attention_variant!r}; allowed values are "
                f"{list(CONTEXT_PARALLEL_VARIANTS)} (or cp_size=1)."
            )
        if attn_implementation not in CONTEXT_PARALLEL_BACKENDS:
            raise ValueError(
                f"{prefix} is not supported for attn_implementation={attn_implementation!r}: torch splits SDPA's "
                f"kernel only; allowed values are {list(CONTEXT_PARALLEL_BACKENDS)} (or cp_size=1)."
            )
        for field, value, encoding in self.position_components():
            if not encoding.reads_position_ids_only():
                raise ValueError(
                    f"{prefix} is not supported for {field}={value!r} ({encoding.kind}): it is computed across all "
                    "keys (a (queries × keys) bias or count, or the whole length), which a rank holding a piece of "
                    f"the sequence does not see; allowed encodings are {position_ids_encodings()} (or cp_size=1)."
                )

    def position_components(self) -> list[tuple[str, str, type]]:
        """(field, value, encoding class) for each position encoding in use, each once: `position_encoding`, the
        scheduled ones, and the relative encoding the attention variant reads (its field is `attention_variant`)."""
        components = [("position_encoding", self.position_encoding, self.position_encoding_class)]
        scheduled = [name for name in self.layer_position_encodings or [] if name != self.position_encoding]
        components += [("layer_position_encodings", name, POSITION_ENCODINGS[name]) for name in dict.fromkeys(scheduled)]
        relative = ATTENTION_VARIANTS[self.attention_variant].relative_encoding_name(self)
        if relative is not None:
            components.append(("attention_variant", self.attention_variant, POSITION_ENCODINGS[relative]))
        return components

    def backend_requirements(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(field, value, the backends it runs on) for every component that does not run on all of them, read from
        the registry entries' `backends`."""
        variant = ("attention_variant", self.attention_variant, ATTENTION_VARIANTS[self.attention_variant])
        components = [variant, *self.position_components()]
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
