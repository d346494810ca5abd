"""What to measure: cases (one model, or one attention kernel, at one backend), the shape they are built at,
transformers' reference models, and case sets naming the cases of one question with the ratios and targets
that answer it (`CASE_SETS`). Families and encodings are chosen by what their registry entries and configs
declare (an encoding's `kind`, a config's default fields, the fields a config class declares), never by
their names. Nothing here runs a model: `measurement` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import transformers
from transformers import AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig, MptConfig

from hf_posvariants import FAMILIES, POSITION_ENCODINGS
from hf_posvariants.attention import ATTENTION_VARIANTS
from hf_posvariants.bias_route import SCORE_FUNCTION_BACKENDS
from hf_posvariants.conversion.diffllama import DIFFLLAMA_CONVENTIONS
from hf_posvariants.position_encodings import selectable_position_encodings


@dataclass(frozen=True)
class BenchShape:
    """The shared size of every model in one run. `num_key_value_heads=None` means no grouping."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    vocab_size: int = 2048
    batch_size: int = 4
    num_key_value_heads: int | None = None
    dropout: float = 0.0  # hidden and attention-probability dropout of every model (transformers' default is 0.1)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads


@dataclass(frozen=True)
class Case:
    """One model at one attention backend. `source` is "ours" or "transformers"."""

    source: str
    model_type: str
    head: str  # "causal" or "masked"
    backend: str
    position_encoding: str | None = None  # None: the family's default
    attention_variant: str | None = None  # None: the family's default
    overrides: tuple[tuple[str, object], ...] = ()
    compiled: bool = False  # the model's forward under torch.compile

    @property
    def label(self) -> str:
        parts = [self.model_type]
        if self.position_encoding:
            parts.append(self.position_encoding)
        if self.attention_variant:
            parts.append(self.attention_variant)
        if self.head == "masked":
            parts.append("mlm")
        if self.overrides:
            parts.append("+".join(f"{k}={v}" for k, v in self.overrides))
        return "/".join(parts) + f"@{self.backend}" + ("+compile" if self.compiled else "")


# ---- choosing families and encodings by what they declare ------------------------------------------

def families_with(auto_class: type = AutoModelForCausalLM, **defaults) -> list[str]:
    """Model types of the registered families that have `auto_class` (a causal head by default) and whose
    default config has these field values."""
    found = []
    for config_class, heads in FAMILIES.items():
        if auto_class not in heads:
            continue
        config = config_class()
        if all(getattr(config, name) == value for name, value in defaults.items()):
            found.append(config_class.model_type)
    return found


def families_declaring(field_name: str) -> list[str]:
    """Model types whose config class declares `field_name` (e.g. DeBERTa's `position_buckets`)."""
    return [config_class.model_type for config_class in FAMILIES
            if field_name in {f.name for f in dataclasses.fields(config_class)}]


def encodings_of_kind(kind: str) -> list[str]:
    return sorted(name for name, encoding in POSITION_ENCODINGS.items() if encoding.kind == kind)


# The Llama block in our config's terms: a family with these defaults is the one that mirrors Llama.
LLAMA_BLOCK = {"norm_type": "rmsnorm", "norm_position": "pre", "mlp_type": "gated", "attention_variant": "standard"}
TRANSFORMER_BLOCK = {"norm_type": "layernorm", "mlp_type": "standard", "attention_variant": "standard"}


# ---- transformers' own models, built at the shared shape -------------------------------------------

def _llama(shape: BenchShape, max_length: int, config_class=LlamaConfig):
    return config_class(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=max_length, tie_word_embeddings=False,
        attention_dropout=shape.dropout,
    )


def _gpt2(shape: BenchShape, max_length: int):
    return GPT2Config(
        vocab_size=shape.vocab_size, n_embd=shape.hidden_size, n_inner=shape.intermediate_size,
        n_layer=shape.num_hidden_layers, n_head=shape.num_attention_heads, n_positions=max_length,
        activation_function="gelu", bos_token_id=0, eos_token_id=0, resid_pdrop=shape.dropout,
        embd_pdrop=shape.dropout, attn_pdrop=shape.dropout,
    )


def _bert(shape: BenchShape, max_length: int):
    return BertConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        max_position_embeddings=max_length, hidden_dropout_prob=shape.dropout,
        attention_probs_dropout_prob=shape.dropout,
    )


def _mpt(shape: BenchShape, max_length: int):
    if shape.intermediate_size % shape.hidden_size:
        raise ValueError(
            f"intermediate_size={shape.intermediate_size} must be a multiple of hidden_size={shape.hidden_size}: "
            "MPT only takes an integer expansion ratio."
        )
    return MptConfig(
        vocab_size=shape.vocab_size, d_model=shape.hidden_size, n_layers=shape.num_hidden_layers,
        n_heads=shape.num_attention_heads, expansion_ratio=shape.intermediate_size // shape.hidden_size,
        max_seq_len=max_length, no_bias=True, resid_pdrop=shape.dropout, emb_pdrop=shape.dropout,
    )


def _diffllama(shape: BenchShape, max_length: int):
    return _llama(shape, max_length, transformers.DiffLlamaConfig)


def deberta_buckets(max_length: int) -> int:
    """DeBERTa-v3's 256 log buckets, shrunk to fit the relative span of short benchmark lengths."""
    return min(256, max_length // 2)


def _deberta_v2(shape: BenchShape, max_length: int):
    """DeBERTa-v3's relative attention (shared position keys, normalised relative embeddings), as ours by default."""
    return transformers.DebertaV2Config(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        max_position_embeddings=max_length, relative_attention=True, position_buckets=deberta_buckets(max_length),
        max_relative_positions=max_length, pos_att_type=["p2c", "c2p"], position_biased_input=False,
        share_att_key=True, norm_rel_ebd="layer_norm", hidden_dropout_prob=shape.dropout,
        attention_probs_dropout_prob=shape.dropout,
    )


# transformers model class name → its config builder
REFERENCE_BUILDERS: dict[str, Callable[[BenchShape, int], transformers.PreTrainedConfig]] = {
    "LlamaForCausalLM": _llama,
    "GPT2LMHeadModel": _gpt2,
    "BertForMaskedLM": _bert,
    "MptForCausalLM": _mpt,
    "DiffLlamaForCausalLM": _diffllama,
    "DebertaV2ForMaskedLM": _deberta_v2,
}


def reference_case(name: str, head: str, backend: str) -> Case:
    """transformers' `name` at `backend` where its class declares support for it, else at eager (what a
    user of that model gets), so the label says what ran."""
    flags = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}
    if backend in flags and not getattr(getattr(transformers, name), flags[backend], False):
        backend = "eager"
    return Case("transformers", name, head, backend)


# ---- ratios ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RatioSpec:
    """numerator / denominator of one metric ("time" or "memory") at every length and task measured; a "≥"
    target is a speed-up, reported the other way round (the denominator's time over the numerator's)."""

    name: str
    numerator: Case
    denominator: Case
    target: str  # "≤1.15×" or "≥2.00×"
    metric: str = "time"
    length: int | None = None  # None: at every length measured; else at this one only, its cases with it


@dataclass
class Ratio:
    name: str
    numerator: str
    denominator: str
    length: int
    task: str
    value: float | None
    target: str

    def passes(self) -> bool | None:
        if self.value is None:
            return None
        bound = float(self.target.strip("≤≥×"))
        return self.value <= bound if self.target.startswith("≤") else self.value >= bound


# ---- case sets ------------------------------------------------------------------------------------

@dataclass
class CaseSet:
    """Cases and the ratios that answer one question. `tasks`: what the set measures when the command line
    does not say (None: train and forward)."""

    cases: list[Case] = field(default_factory=list)
    ratios: list[RatioSpec] = field(default_factory=list)
    tasks: tuple[str, ...] | None = None

    def add(self, *cases: Case) -> None:
        for case in cases:
            if case not in self.cases:
                self.cases.append(case)

    def compare(self, name: str, numerator: Case, denominator: Case, target: str, metric: str = "time",
                length: int | None = None) -> None:
        self.add_ratio(RatioSpec(name, numerator, denominator, target, metric, length))

    def add_ratio(self, spec: RatioSpec) -> None:
        self.add(spec.numerator, spec.denominator)
        self.ratios.append(spec)

    def pinned_lengths(self) -> list[int]:
        return sorted({spec.length for spec in self.ratios if spec.length is not None})

    def cases_at(self, length: int) -> list[Case]:
        """The cases measured at `length`: those of a ratio pinned there, and every case not only in pinned ratios."""
        pinned = {case for spec in self.ratios if spec.length is not None
                  for case in (spec.numerator, spec.denominator)}
        here = {case for spec in self.ratios if spec.length == length for case in (spec.numerator, spec.denominator)}
        free = {case for spec in self.ratios if spec.length is None for case in (spec.numerator, spec.denominator)}
        return [case for case in self.cases if case in here or case in free or case not in pinned]


def variant_fits(variant: str, config_class: type) -> bool:
    """Whether the attention variant runs on the family's default config (DeBERTa's needs DeBERTa's fields)."""
    try:
        ATTENTION_VARIANTS[variant].validate_config(config_class())
    except ValueError:
        return False
    return True


def variant_cases(backends: list[str], families: list[str] | None = None,
                  encodings: list[str] | None = None) -> list[Case]:
    """Every family with a causal head × position encoding at every backend, plus every attention
    variant that is not the family's default, with the family's default encoding."""
    cases = []
    for config_class, heads in FAMILIES.items():
        model_type = config_class.model_type
        if (families and model_type not in families) or AutoModelForCausalLM not in heads:
            continue
        for backend in backends:
            for encoding in sorted(selectable_position_encodings()):
                if not encodings or encoding in encodings:
                    cases.append(Case("ours", model_type, "causal", backend, encoding))
            for variant in sorted(ATTENTION_VARIANTS):
                if variant != config_class().attention_variant and variant_fits(variant, config_class):
                    cases.append(Case("ours", model_type, "causal", backend, None, variant))
    return cases


def variants_case_set(backends: list[str], families: list[str] | None = None,
                      encodings: list[str] | None = None) -> CaseSet:
    """Every variant, and each transformers model against the case of ours built to match it: same block
    type, norm position, activation, position scheme and tying, so the ratio compares implementations."""
    chosen = CaseSet(variant_cases(backends, families, encodings))
    llama, transformer = families_with(**LLAMA_BLOCK), families_with(**TRANSFORMER_BLOCK)
    rotary, biases = encodings_of_kind("rotary"), encodings_of_kind("bias")
    pre_ln_gelu = (("norm_position", "pre"), ("hidden_act", "gelu"), ("scale_embeddings", False))
    no_biases = (("attention_bias", False), ("mlp_bias", False))
    for backend in backends:
        if llama and rotary:
            ours = Case("ours", llama[0], "causal", backend, rotary[0])
            chosen.compare(f"ours / LlamaForCausalLM time ({backend})", ours,
                           reference_case("LlamaForCausalLM", "causal", backend), "≤1.00×")
            for bias in biases:
                chosen.compare(f"{bias} / {rotary[0]} time ({backend})",
                               Case("ours", llama[0], "causal", backend, bias), ours, "≤1.15×")
        if transformer and "learned" in POSITION_ENCODINGS:
            chosen.compare(f"ours / GPT2LMHeadModel time ({backend})",
                           Case("ours", transformer[0], "causal", backend, "learned", overrides=pre_ln_gelu),
                           reference_case("GPT2LMHeadModel", "causal", backend), "≤1.15×")
            chosen.compare(f"ours / BertForMaskedLM time ({backend})",
                           Case("ours", transformer[0], "masked", backend, "learned",
                                overrides=(("scale_embeddings", False),)),
                           reference_case("BertForMaskedLM", "masked", backend), "≤1.15×")
        if transformer and "alibi" in POSITION_ENCODINGS:
            chosen.compare(f"ours / MptForCausalLM time ({backend})",
                           Case("ours", transformer[0], "causal", backend, "alibi", overrides=pre_ln_gelu + no_biases),
                           reference_case("MptForCausalLM", "causal", backend), "≤1.15×")
        for spec in differential_ratios(backend) + deberta_ratios(backend):
            chosen.add_ratio(spec)
    if "eager" in backends and "sdpa" in backends and llama:
        for encoding in sorted(POSITION_ENCODINGS):
            if POSITION_ENCODINGS[encoding].kind != "bias" and (not encodings or encoding in encodings):
                chosen.compare(f"SDPA speed-up over eager ({encoding})", Case("ours", llama[0], "causal", "sdpa", encoding),
                               Case("ours", llama[0], "causal", "eager", encoding), "≥2.00×")
    return chosen


def differential_ratios(backend: str) -> list[RatioSpec]:
    """Ours, computing what DiffLlama computes, against DiffLlama and against standard attention."""
    family = (families_with(attention_variant="differential") or families_with(**LLAMA_BLOCK))[:1]
    if "differential" not in ATTENTION_VARIANTS or not family:
        return []
    conventions = tuple(sorted((k, v) for k, v in DIFFLLAMA_CONVENTIONS.items() if k != "position_encoding"))
    ours = Case("ours", family[0], "causal", backend, DIFFLLAMA_CONVENTIONS["position_encoding"], "differential",
                conventions)
    standard = Case("ours", family[0], "causal", backend, DIFFLLAMA_CONVENTIONS["position_encoding"], "standard")
    return [
        RatioSpec(f"ours / DiffLlamaForCausalLM time ({backend})", ours,
                  reference_case("DiffLlamaForCausalLM", "causal", backend), "≤1.00×"),
        RatioSpec(f"differential / standard attention time ({backend})", ours, standard, "≤1.15×"),
    ]


# DeBERTa-v3's relative-position settings as its checkpoints ship them.
DEBERTA_V3_TABLE = (("position_buckets", 256), ("max_relative_positions", 512))


def deberta_ratios(backend: str) -> list[RatioSpec]:
    """The relative-attention family (the one declaring `position_buckets`) without its Enhanced Mask Decoder
    (transformers' DebertaV2 has none) against DebertaV2ForMaskedLM and BertForMaskedLM, with their targets."""
    family = families_declaring("position_buckets")
    if not family:
        return []
    ours = Case("ours", family[0], "masked", backend, overrides=(("emd_layers", 0),))
    deberta = reference_case("DebertaV2ForMaskedLM", "masked", backend)
    bert = reference_case("BertForMaskedLM", "masked", backend)
    return [
        RatioSpec(f"ours / DebertaV2ForMaskedLM time ({backend})", ours, deberta, "≤0.55×"),
        RatioSpec(f"ours / BertForMaskedLM time ({backend})", ours, bert, "≤1.30×"),
        RatioSpec(f"ours / DebertaV2ForMaskedLM memory ({backend})", ours, deberta, "≤0.70×", "memory"),
    ]


def deberta_case_set(backends: list[str], families=None, encodings=None) -> CaseSet:
    """The DeBERTa targets, plus ours with its Enhanced Mask Decoder (what it costs)."""
    chosen = CaseSet()
    for backend in backends:
        for spec in deberta_ratios(backend):
            chosen.add_ratio(spec)
        for model_type in families_declaring("emd_layers"):
            chosen.add(Case("ours", model_type, "masked", backend, overrides=(("emd_layers", 2),)))
    return chosen


def differential_case_set(backends: list[str], families=None, encodings=None) -> CaseSet:
    """Differential attention against transformers' DiffLlama and against standard attention."""
    chosen = CaseSet()
    for backend in backends:
        for spec in differential_ratios(backend):
            chosen.add_ratio(spec)
    return chosen


def score_bias_encodings(encodings: list[str] | None) -> list[str]:
    chosen = [name for name in selectable_position_encodings() if POSITION_ENCODINGS[name].kind == "bias"]
    return [name for name in chosen if not encodings or name in encodings]


def score_biases_against_rope(backend: str, encodings: list[str] | None, memory_target: str, time_target: str) -> CaseSet:
    """Every score-bias encoding at `backend` against RoPE on SDPA, in the Llama block: memory and time."""
    chosen = CaseSet()
    for model_type in families_with(**LLAMA_BLOCK)[:1]:
        rope = Case("ours", model_type, "causal", "sdpa", encodings_of_kind("rotary")[0])
        for encoding in score_bias_encodings(encodings):
            biased = Case("ours", model_type, "causal", backend, encoding)
            chosen.compare(f"{encoding} on {backend} / rope on sdpa memory", biased, rope, memory_target, "memory")
            chosen.compare(f"{encoding} on {backend} / rope on sdpa time", biased, rope, time_target)
    return chosen


def long_context_case_set(backends=None, families=None, encodings=None) -> CaseSet:
    """The long-context rows: score biases on flex (score functions over small tables, no (length × length)
    tensor) against RoPE on SDPA; run at long lengths, forward only."""
    return score_biases_against_rope("flex_attention", encodings, "≤1.50×", "≤1.50×")


def bias_training_case_set(backends=None, families=None, encodings=None) -> CaseSet:
    """The bias training rows: score biases on SDPA (folded into the mask once per forward; on CPU a learned
    bias trains through `FlashAttentionWithBiasGradient`) against RoPE on SDPA."""
    return score_biases_against_rope("sdpa", encodings, "≤1.30×", "≤1.30×")


def training_targets_case_set(backends=None, families=None, encodings=None) -> CaseSet:
    """The training-step targets of bias encodings, DeBERTa and differential attention on SDPA, each at its own
    length: biases at 2,048 against RoPE (FIRE also against T5), DeBERTa without its Enhanced Mask Decoder at 256
    against DebertaV2, the differential family at 1,024 against the Llama-block family at the same shape (the
    differential head count counts softmax maps, so the parameters match); peak memory of each over its
    denominator's."""
    chosen = CaseSet(tasks=("train",))
    llama = families_with(**LLAMA_BLOCK)[:1]
    rotary = encodings_of_kind("rotary")[:1]
    if llama and rotary:
        rope = Case("ours", llama[0], "causal", "sdpa", rotary[0])
        by_name = {name: Case("ours", llama[0], "causal", "sdpa", name) for name in score_bias_encodings(encodings)}
        for name, target in (("t5_bias", "≤1.50×"), ("alibi", "≤1.10×")):
            if name in by_name:
                chosen.compare(f"{name} / {rotary[0]} training step", by_name[name], rope, target, length=2048)
        if "fire" in by_name and "t5_bias" in by_name:
            chosen.compare("fire / t5_bias training step", by_name["fire"], by_name["t5_bias"], "≤1.50×", length=2048)
        for name in ("t5_bias", "fire", "alibi"):
            if name in by_name:
                chosen.compare(f"{name} / {rotary[0]} peak memory", by_name[name], rope, "≤1.30×", "memory", 2048)
    for spec in deberta_ratios("sdpa")[:1]:
        chosen.add_ratio(dataclasses.replace(spec, name="ours / DebertaV2ForMaskedLM training step",
                                             target="≤0.85×", length=256))
        chosen.add_ratio(dataclasses.replace(spec, name="ours / DebertaV2ForMaskedLM peak memory", target="≤1.30×",
                                             metric="memory", length=256))
        # The same pair with DeBERTa-v3's own relative table (microsoft/deberta-v3-*: 256 log buckets over 512
        # positions, so 512 rows at any length) instead of the bucket count shrunk to the length.
        ours, reference = (dataclasses.replace(case, overrides=case.overrides + DEBERTA_V3_TABLE)
                           for case in (spec.numerator, spec.denominator))
        chosen.compare("ours / DebertaV2ForMaskedLM training step, v3's relative table", ours, reference, "≤0.85×",
                       length=256)
    differential = families_with(attention_variant="differential")[:1]
    if llama and differential:
        standard = Case("ours", llama[0], "causal", "sdpa")
        ours = Case("ours", differential[0], "causal", "sdpa")
        chosen.compare(f"{differential[0]} / {llama[0]} training step", ours, standard, "≤1.15×", length=1024)
        chosen.compare(f"{differential[0]} / {llama[0]} peak memory", ours, standard, "≤1.30×", "memory", 1024)
    return chosen


CASE_SETS: dict[str, Callable[..., CaseSet]] = {
    "variants": variants_case_set,
    "deberta": deberta_case_set,
    "differential": differential_case_set,
    "long_context": long_context_case_set,
    "bias_training": bias_training_case_set,
    "training_targets": training_targets_case_set,
}


# ---- kernel-only cases ------------------------------------------------------------------------------

# How a kernel case's scores get their bias. Mask forms reach eager and SDPA through transformers' attention
# functions; score forms are flex_attention score functions over small tables, with a causal block mask.
KERNEL_BIASES = {
    "none": "causal only (SDPA's causal fast path)",
    "mask": "a fixed (1, H, T, T) float mask",
    "learned_mask": "a (1, H, T, T) float mask that needs a gradient",
    "alibi": "ALiBi's slope per head times the distance, as a score function",
    "t5_buckets": "a learned (buckets × H) table indexed per pair, as a score function",
    "t5_distances": "a learned (H × 2T−1) per-distance table, as a score function",
    "c2p_p2c": "DeBERTa's two (B, H, T, 2k) relative terms gathered per pair",
}
SCORE_FUNCTION_BIASES = ("alibi", "t5_buckets", "t5_distances")


@dataclass(frozen=True)
class KernelCase:
    """The attention kernel alone, forward + backward, as one layer calls it.

    `bias` is one of `KERNEL_BIASES`: a mask as the `bias` kind of position encoding hands it to eager and SDPA
    (no causal fast path), or a flex score function. `calls` and `value_width`: differential attention as we
    run it (two calls on equal-width value halves) or as transformers' DiffLlama does (one call with
    double-width values). `kernel_options`: flex's block sizes and stages (the defaults exceed Hopper's shared
    memory for a score function reading a learned table).
    """

    backend: str
    bias: str = "none"
    calls: int = 1
    value_width: int = 1
    kernel_options: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.bias not in KERNEL_BIASES:
            raise ValueError(f"bias={self.bias!r} is not a kernel bias; allowed values are {sorted(KERNEL_BIASES)}.")
        if self.bias in SCORE_FUNCTION_BIASES and self.backend not in SCORE_FUNCTION_BACKENDS:
            raise ValueError(f"bias={self.bias!r} is a score function: backend must be one of "
                             f"{list(SCORE_FUNCTION_BACKENDS)}, not {self.backend!r}.")

    @property
    def label(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self.kernel_options)
        return f"{self.backend}, {self.bias}, {self.calls} call(s) × {self.value_width}× value width{options}"


def kernel_cases(backends: list[str]) -> list[KernelCase]:
    """Per backend: plain causal attention, a bias mask when a registered encoding is of the `bias` kind,
    and the two ways to run a differential layer when the `differential` attention variant is registered."""
    has_bias = any(encoding.kind == "bias" for encoding in POSITION_ENCODINGS.values())
    cases = []
    for backend in backends:
        cases.append(KernelCase(backend))
        if has_bias:
            cases.append(KernelCase(backend, bias="mask"))
        if "differential" in ATTENTION_VARIANTS:
            cases += [KernelCase(backend, calls=2), KernelCase(backend, value_width=2)]
    return cases



# ---- points: one case alone in its own process -------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One case measured at one shape, length and task, alone in a process of its own (a fault there, e.g. a
    CUDA illegal memory access, cannot touch the next). `task` is "train", "forward" or "generate" (`new_tokens`
    greedily after a prompt of `length`) for a model, "kernel" (forward + backward) for a `KernelCase`, whose
    batch and heads come from `shape` and head width from hidden size over heads."""

    case: Case | KernelCase
    shape: BenchShape
    length: int
    task: str
    new_tokens: int = 0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        allowed = ("kernel",) if isinstance(self.case, KernelCase) else ("train", "forward", "generate")
        if self.task not in allowed:
            raise ValueError(f"task={self.task!r} does not fit {self.case.label}; allowed values are {list(allowed)}.")
        if (self.task == "generate") != (self.new_tokens > 0):
            raise ValueError(f"new_tokens={self.new_tokens} must be > 0 exactly when task='generate'.")

    @property
    def label(self) -> str:
        return f"{self.case.label} {self.task} {self.shape.batch_size}×{self.length}"

    @property
    def compiles(self) -> bool:
        """Whether its step generates code: a model under torch.compile, or flex attention (always compiled)."""
        return getattr(self.case, "compiled", False) or self.case.backend == "flex_attention"


@dataclass(frozen=True)
class PointRatio:
    """numerator / denominator of two points: their time and their peak memory."""

    name: str
    numerator: Point
    denominator: Point
