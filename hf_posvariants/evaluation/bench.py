"""Speed, memory and FLOP rate of our variants against transformers' own models: the one measuring harness.

A *case* is one model at one backend: ours (family × position encoding × attention variant) or a
reference model from transformers built at the same width, depth and vocabulary. A *case set* names the
cases of one question together with the ratios that answer it (`CASE_SETS`): every variant against the
references, DeBERTa against DebertaV2 and BERT, differential attention against DiffLlama and standard
attention. Families and encodings are chosen by what their registry entries and configs declare (an
encoding's `kind`, a config's default fields, the fields a config class declares), never by their names.

Cases of one sequence length are timed together and interleaved: each round runs one step of every case,
in an order rotated per round, so slow drift of a shared machine spreads over all of them; the figure is
the median of the rounds after warm-up. On a GPU a step is timed with CUDA events; on a CPU with wall
time, or with this process's CPU time (`clock="cpu"`: waiting for a core on a shared machine is not
counted). `amp=True` runs forward and loss under bf16 autocast.

FLOPs per step are model FLOPs: counted once per model by `torch.utils.flop_counter.FlopCounterMode`
on one step of the same model at the eager backend (every matmul, attention's included, backward
included), so they do not depend on the kernel that runs them; divided by the median time they give the
achieved FLOP/s, and divided by the device's peak (`peak_tflops`, or the table below for bf16 on known
GPUs) the model FLOPs utilisation (MFU).

Peak memory is what a training step adds to a built model, over two steps (gradients, AdamW state,
activations), measured for each case alone. On a GPU: `torch.cuda.max_memory_allocated` minus the
allocation after building. On a CPU, a fresh process builds the model (and, for a forward, runs one
first, so a compiled kernel's one-off cost is left out), resets its resident-set high-water mark
(`/proc/self/clear_refs`), runs the steps and reports VmHWM minus the resident set before them. (`ru_maxrss` would be wrong here: a child inherits its parent's peak at fork.) It includes
allocator caching, so it bounds from above what the step needs, measured the same way for every case.

Kernel-only cases (`KernelCase`) time the attention kernel alone, forward and backward, with
`torch.utils.benchmark`: what a backend can gain at most, without the rest of a training step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config, LlamaConfig, MptConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_posvariants
from hf_posvariants import FAMILIES, POSITION_ENCODINGS
from hf_posvariants.attention import ATTENTION_VARIANTS, eager_attention_forward
from hf_posvariants.position_encodings import selectable_position_encodings
from hf_posvariants.conversion.diffllama import DIFFLLAMA_CONVENTIONS
from hf_posvariants.training.recipes import config_class_of


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
        return "/".join(parts) + f"@{self.backend}"


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
    cases: list[Case] = field(default_factory=list)
    ratios: list[RatioSpec] = field(default_factory=list)

    def add(self, *cases: Case) -> None:
        for case in cases:
            if case not in self.cases:
                self.cases.append(case)

    def compare(self, name: str, numerator: Case, denominator: Case, target: str, metric: str = "time") -> None:
        self.add_ratio(RatioSpec(name, numerator, denominator, target, metric))

    def add_ratio(self, spec: RatioSpec) -> None:
        self.add(spec.numerator, spec.denominator)
        self.ratios.append(spec)


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


def deberta_ratios(backend: str) -> list[RatioSpec]:
    """The relative-attention family (the one declaring `position_buckets`) without its Enhanced Mask Decoder
    (transformers' DebertaV2 has none) against DebertaV2ForMaskedLM and BertForMaskedLM: issue 3's targets."""
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
    """Issue 3's DeBERTa targets, plus ours with its Enhanced Mask Decoder (what it costs)."""
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
    """Issue 10's long-context rows: score biases on flex (score functions over small tables, no (length × length)
    tensor) against RoPE on SDPA; run at long lengths, forward only."""
    return score_biases_against_rope("flex_attention", encodings, "≤1.50×", "≤1.50×")


def bias_training_case_set(backends=None, families=None, encodings=None) -> CaseSet:
    """Issue 10's training rows: score biases on SDPA (folded into the mask once per forward; on CPU a learned
    bias trains through `FlashAttentionWithBiasGradient`) against RoPE on SDPA."""
    return score_biases_against_rope("sdpa", encodings, "≤1.30×", "≤1.30×")


CASE_SETS: dict[str, Callable[..., CaseSet]] = {
    "variants": variants_case_set,
    "deberta": deberta_case_set,
    "differential": differential_case_set,
    "long_context": long_context_case_set,
    "bias_training": bias_training_case_set,
}


# ---- building and running one case ----------------------------------------------------------------

def build_model(case: Case, shape: BenchShape, max_length: int, device: str) -> torch.nn.Module:
    """A fresh model for a case, seeded so every run builds the same weights."""
    torch.manual_seed(0)
    if case.source == "transformers":
        config = REFERENCE_BUILDERS[case.model_type](shape, max_length)
        model_class = getattr(transformers, case.model_type)
        return model_class._from_config(config, attn_implementation=case.backend).to(device)
    config_class = config_class_of(case.model_type)
    fields = dict(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=max_length,
        hidden_dropout=shape.dropout, attention_dropout=shape.dropout,
    )
    if case.position_encoding:
        fields["position_encoding"] = case.position_encoding
    if case.attention_variant:
        fields["attention_variant"] = case.attention_variant
    if "position_buckets" in {f.name for f in dataclasses.fields(config_class)}:
        fields["position_buckets"] = deberta_buckets(max_length)
    fields.update(dict(case.overrides))
    auto_class = AutoModelForCausalLM if case.head == "causal" else AutoModelForMaskedLM
    return auto_class.from_config(config_class(**fields), attn_implementation=case.backend).to(device)


class Runner:
    """A model with its optimizer and a fixed batch, ready to run one training step or forward."""

    def __init__(self, case: Case, shape: BenchShape, length: int, device: str, amp: bool = False):
        self.model = build_model(case, shape, length, device)
        self.device = device
        self.amp = amp
        self.no_cache = {"use_cache": False} if case.head == "causal" else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(3, shape.vocab_size, (shape.batch_size, length), generator=generator).to(device)

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def train_step(self) -> None:
        self.model.train()
        with self.autocast():
            loss = self.model(input_ids=self.input_ids, labels=self.input_ids, **self.no_cache).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def forward(self) -> None:
        self.model.eval()
        with self.autocast():
            self.model(input_ids=self.input_ids, **self.no_cache)

    def step(self, task: str) -> None:
        self.train_step() if task == "train" else self.forward()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_seconds(run: Callable[[], None], device: str, clock: str) -> float:
    """Seconds of one call: CUDA events on a GPU (no host-side gaps counted), the chosen clock on a CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    now = CLOCKS[clock]
    begin = now()
    run()
    return now() - begin


def count_flops(runner: Runner, task: str) -> int:
    """FLOPs of one step, counted on the operators it runs (backward included)."""
    counter = FlopCounterMode(display=False)
    with counter:
        runner.step(task)
    return counter.get_total_flops()


def model_flops(case: Case, shape: BenchShape, length: int, task: str, device: str, amp: bool = False) -> int:
    """FLOPs of one step of the model, whichever kernel runs it: counted on the same model at the eager
    backend, whose attention is plain matmuls (fused kernels such as SDPA's on CPU have no FLOP formula)."""
    return count_flops(Runner(dataclasses.replace(case, backend="eager"), shape, length, device, amp), task)


# The eager count materialises (batch, heads, length, length) fp32 scores, a few at a time: beyond this many bytes
# for one of them (16k tokens at 4 heads is 4 GiB) the count is skipped and FLOPs are reported as unknown.
FLOP_COUNT_SCORE_BYTES = 1 << 30


def eager_scores_fit(shape: BenchShape, length: int) -> bool:
    return shape.batch_size * shape.num_attention_heads * length * length * 4 <= FLOP_COUNT_SCORE_BYTES


@dataclass
class Timing:
    case: Case
    task: str
    length: int
    seconds: list[float] = field(default_factory=list)
    error: str | None = None
    peak_memory_mib: float | None = None
    flops: int | None = None

    @property
    def median_ms(self) -> float | None:
        return 1000 * statistics.median(self.seconds) if self.seconds else None

    def achieved_tflops(self) -> float | None:
        if not self.seconds or not self.flops:
            return None
        return self.flops / statistics.median(self.seconds) / 1e12

    def as_dict(self, peak_tflops: float | None = None) -> dict:
        spread = (1000 * (max(self.seconds) - min(self.seconds))) if self.seconds else None
        achieved = self.achieved_tflops()
        return {
            "label": self.case.label, "case": asdict(self.case), "task": self.task, "length": self.length,
            "median_ms": self.median_ms, "spread_ms": spread, "rounds": len(self.seconds),
            "peak_memory_mib": self.peak_memory_mib, "flops_per_step": self.flops, "achieved_tflops": achieved,
            "mfu": achieved / peak_tflops if achieved is not None and peak_tflops else None, "error": self.error,
        }


def time_cases(cases: list[Case], shape: BenchShape, length: int, task: str, warmup: int, rounds: int,
               device: str, clock: str = "wall", amp: bool = False) -> list[Timing]:
    """Interleaved timing of one task at one length; a case that cannot be built or run is recorded
    with its error (e.g. flex attention without a compiler) instead of stopping the run."""
    timings = [Timing(case, task, length) for case in cases]
    runners: dict[int, Runner] = {}
    flops: dict[Case, int] = {}  # per model: the same at every backend
    for index, timing in enumerate(timings):
        try:
            runners[index] = Runner(timing.case, shape, length, device, amp)
            for _ in range(warmup):
                runners[index].step(task)
            eager = dataclasses.replace(timing.case, backend="eager")
            if eager not in flops and eager_scores_fit(shape, length):
                flops[eager] = model_flops(eager, shape, length, task, device, amp)
            timing.flops = flops.get(eager)
        except Exception as error:  # noqa: BLE001 — a backend that does not work here is a result
            timing.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            runners.pop(index, None)
    order = list(runners)
    for round_index in range(rounds):
        shift = round_index % max(len(order), 1)
        for index in order[shift:] + order[:shift]:
            synchronize(device)
            timings[index].seconds.append(timed_seconds(lambda: runners[index].step(task), device, clock))
    return timings


# ---- peak memory --------------------------------------------------------------------------------

def peak_memory_mib(case: Case, shape: BenchShape, length: int, task: str, device: str, amp: bool = False) -> float:
    """MiB a step adds to the built model at its peak over two steps (see the module docstring)."""
    if device.startswith("cuda"):
        runner = Runner(case, shape, length, device, amp)
        torch.cuda.synchronize()
        built = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            runner.step(task)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - built) / 2**20
        del runner
        torch.cuda.empty_cache()
        return peak
    payload = json.dumps({"case": asdict(case), "shape": asdict(shape), "length": length, "task": task, "amp": amp})
    package_root = str(Path(hf_posvariants.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    code = "from hf_posvariants.evaluation.bench import memory_child; memory_child()"
    result = subprocess.run([sys.executable, "-c", code, payload], env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def memory_child() -> None:
    """In a fresh process: build the case, reset the high-water mark, run two steps, print the growth.

    A forward keeps nothing from one step to the next, so it runs once before the reset: what stays resident
    after it (a compiled kernel, e.g. flex attention's, and the compiler's caches) is not what a forward needs.
    """
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    case = Case(**{**spec["case"], "overrides": tuple(tuple(item) for item in spec["case"]["overrides"])})
    runner = Runner(case, BenchShape(**spec["shape"]), spec["length"], "cpu", spec["amp"])
    if spec["task"] == "forward":
        runner.step("forward")
    reset_peak_rss()
    built = process_status_mib("VmRSS")
    for _ in range(2):
        runner.step(spec["task"])
    print(process_status_mib("VmHWM") - built)


def reset_peak_rss() -> None:
    """Reset Linux's VmHWM to the current resident set (writing 5 to clear_refs, Linux ≥ 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def process_status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}: peak memory on CPU needs Linux.")


# ---- the whole run ----------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for MFU when --peak-tflops is not given.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}


def device_peak_tflops(device: str, amp: bool, peak_tflops: float | None) -> float | None:
    if peak_tflops is not None:
        return peak_tflops
    if device.startswith("cuda") and amp:
        name = torch.cuda.get_device_name()
        return next((peak for model, peak in BF16_PEAK_TFLOPS.items() if model in name), None)
    return None


def compute_ratios(specs: list[RatioSpec], timings: list[Timing]) -> list[Ratio]:
    values = {("time", t.case, t.task, t.length): t.median_ms for t in timings}
    values |= {("memory", t.case, t.task, t.length): t.peak_memory_mib for t in timings}
    ratios = []
    for length in sorted({t.length for t in timings}):
        for task in ("train", "forward"):
            for spec in specs:
                top = values.get((spec.metric, spec.numerator, task, length))
                bottom = values.get((spec.metric, spec.denominator, task, length))
                if top is None or bottom is None:
                    continue
                value = bottom / top if spec.target.startswith("≥") else top / bottom
                ratios.append(Ratio(spec.name, spec.numerator.label, spec.denominator.label, length, task, value,
                                    spec.target))
    return ratios


def run_benchmark(shape: BenchShape, lengths: list[int], backends: list[str], warmup: int, rounds: int,
                  device: str, tasks: tuple[str, ...] = ("train", "forward"), memory: bool = True,
                  families: list[str] | None = None, encodings: list[str] | None = None,
                  clock: str = "wall", case_set: str = "variants", amp: bool = False,
                  peak_tflops: float | None = None, log=print) -> dict:
    """Time, count and measure every case of `case_set`. Ratios "≥" are speed-ups (denominator time over
    numerator time), the others numerator over denominator."""
    if clock not in CLOCKS or (clock == "cpu" and device.startswith("cuda")):
        raise ValueError(f"clock={clock!r} is not supported on {device}; allowed values are "
                         f"{['wall'] if device.startswith('cuda') else list(CLOCKS)}.")
    if case_set not in CASE_SETS:
        raise ValueError(f"case_set={case_set!r} is not supported; allowed values are {sorted(CASE_SETS)}.")
    chosen = CASE_SETS[case_set](backends, families, encodings)
    timings: list[Timing] = []
    for length in lengths:
        for task in tasks:
            log(f"timing {len(chosen.cases)} cases: {task} at length {length}")
            timings += time_cases(chosen.cases, shape, length, task, warmup, rounds, device, clock, amp)
    if memory:
        log("measuring peak memory, one case at a time")
        in_memory_ratios = {case for spec in chosen.ratios if spec.metric == "memory" for case in (spec.numerator, spec.denominator)}
        for timing in timings:
            if timing.error is None and (timing.task == "train" or timing.case in in_memory_ratios):
                timing.peak_memory_mib = peak_memory_mib(timing.case, shape, timing.length, timing.task, device, amp)
    peak = device_peak_tflops(device, amp, peak_tflops)
    return {
        "case_set": case_set,
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": asdict(shape), "lengths": lengths, "warmup": warmup, "rounds": rounds, "clock": clock,
        "precision": "bf16 autocast" if amp else "fp32", "peak_tflops": peak,
        "memory_method": "cuda.max_memory_allocated over 2 steps minus the built model" if device.startswith("cuda")
        else "VmHWM of a fresh process over 2 steps minus its resident set with the model built",
        "timings": [t.as_dict(peak) for t in timings],
        "ratios": [asdict(r) | {"passes": r.passes()} for r in compute_ratios(chosen.ratios, timings)],
    }


def _number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_report(result: dict) -> str:
    shape = result["shape"]
    peak = result["peak_tflops"]
    lines = [
        f"# Speed and memory: case set `{result['case_set']}`", "",
        f"Device: {result['device']} ({result['threads']} threads), torch {result['torch']}, transformers "
        f"{result['transformers']}, {result['precision']}. Shape: hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads "
        f"({shape['num_key_value_heads'] or shape['num_attention_heads']} KV), intermediate "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']}, batch {shape['batch_size']}, dropout "
        f"{shape['dropout']}. Clock: {result['clock']} time. Median of {result['rounds']} interleaved rounds "
        f"after {result['warmup']} warm-up steps. Memory: {result['memory_method']}. FLOPs: counted by "
        f"FlopCounterMode; MFU against {f'{peak:g} TFLOP/s' if peak else 'no known peak (pass --peak-tflops)'}.",
        "", "## Ratios (measured in this run)", "",
        "| ratio | length | task | value | target | meets |", "|---|---|---|---|---|---|",
    ]
    for ratio in result["ratios"]:
        meets = {True: "yes", False: "no", None: "–"}[ratio["passes"]]
        lines.append(f"| {ratio['name']} | {ratio['length']} | {ratio['task']} | {ratio['value']:.2f}× | "
                     f"{ratio['target']} | {meets} |")
    lines += ["", "## Every case", "",
              "| case | task | length | median ms | spread ms | peak MiB | GFLOP/step | TFLOP/s | MFU |",
              "|---|---|---|---|---|---|---|---|---|"]
    for timing in result["timings"]:
        if timing["error"]:
            lines.append(f"| {timing['label']} | {timing['task']} | {timing['length']} | unavailable: "
                         f"{timing['error']} | | | | | |")
            continue
        gflops = timing["flops_per_step"] / 1e9 if timing["flops_per_step"] else None
        mfu = f"{100 * timing['mfu']:.1f}%" if timing["mfu"] is not None else ""
        lines.append(f"| {timing['label']} | {timing['task']} | {timing['length']} | {timing['median_ms']:.1f} | "
                     f"{timing['spread_ms']:.1f} | {_number(timing['peak_memory_mib'], 0)} | {_number(gflops, 2)} | "
                     f"{_number(timing['achieved_tflops'], 3)} | {mfu} |")
    return "\n".join(lines) + "\n"


# ---- kernel-only cases ------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelCase:
    """The attention kernel alone, forward + backward, as one layer calls it.

    `bias`: the scores carry an additive (1, H, T, T) float mask, as the `bias` kind of position encoding
    hands them to eager and SDPA (no causal fast path); else the mask is causal only. `calls` and
    `value_width`: differential attention as we run it (two calls on equal-width value halves) or as
    transformers' DiffLlama does (one call with double-width values).
    """

    backend: str
    bias: bool = False
    calls: int = 1
    value_width: int = 1

    @property
    def label(self) -> str:
        form = "bias mask" if self.bias else "causal"
        return f"{self.backend}, {form}, {self.calls} call(s) × {self.value_width}× value width"


class _KernelModule(torch.nn.Module):
    """What transformers' attention functions read from the calling layer."""

    num_key_value_groups = 1
    is_causal = True


def kernel_cases(backends: list[str]) -> list[KernelCase]:
    """Per backend: plain causal attention, a bias mask when a registered encoding is of the `bias` kind,
    and the two ways to run a differential layer when the `differential` attention variant is registered."""
    has_bias = any(encoding.kind == "bias" for encoding in POSITION_ENCODINGS.values())
    cases = []
    for backend in backends:
        cases.append(KernelCase(backend))
        if has_bias:
            cases.append(KernelCase(backend, bias=True))
        if "differential" in ATTENTION_VARIANTS:
            cases += [KernelCase(backend, calls=2), KernelCase(backend, value_width=2)]
    return cases


def kernel_step(case: KernelCase, batch: int, heads: int, length: int, head_dim: int, device: str,
                dtype: torch.dtype) -> Callable[[], None]:
    """A closure running one forward + backward of the kernel on fixed random inputs."""
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()

    query, key = tensor(batch, heads, length, head_dim), tensor(batch, heads, length, head_dim)
    value = tensor(batch, heads, length, head_dim * case.value_width)
    causal = torch.full((length, length), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)[None, None]
    if case.bias:
        mask = causal + torch.randn(1, heads, length, length, generator=generator).to(device, dtype)
    else:  # SDPA takes its causal fast path without a mask; our eager kernel needs one
        mask = causal if case.backend == "eager" else None
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(case.backend, eager_attention_forward)
    module = _KernelModule().train()

    def step() -> None:
        outputs = [attend(module, query, key, value, mask, scaling=head_dim**-0.5)[0] for _ in range(case.calls)]
        sum(output.float().sum() for output in outputs).backward()

    return step


def run_kernel_benchmark(backends: list[str], batch: int, heads: int, lengths: list[int], head_dim: int,
                         device: str, clock: str = "wall", amp: bool = False, min_run_time: float = 1.0) -> dict:
    """Median time of each kernel case by `torch.utils.benchmark` (blocked autorange: repeated blocks of
    calls until `min_run_time` seconds are spent; synchronised on a GPU)."""
    dtype = torch.bfloat16 if amp else torch.float32
    timer = CLOCKS[clock] if not device.startswith("cuda") else benchmark.utils.timer.timer
    results, ratios = [], []
    for length in lengths:
        by_case = {}
        for case in kernel_cases(backends):
            entry = {"label": case.label, "case": asdict(case), "length": length, "median_ms": None, "iqr_ms": None,
                     "blocks": 0, "error": None}
            try:
                step = kernel_step(case, batch, heads, length, head_dim, device, dtype)
                step()  # warm-up
                measurement = benchmark.Timer("step()", globals={"step": step}, timer=timer,
                                              num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
                entry.update(median_ms=1000 * measurement.median, iqr_ms=1000 * measurement.iqr,
                             blocks=len(measurement.times))
                by_case[case] = entry["median_ms"]
            except Exception as error:  # noqa: BLE001 — a backend that does not work here is a result
                entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            results.append(entry)
        pairs = [("SDPA speed-up over eager (causal)", KernelCase("eager"), KernelCase("sdpa")),
                 ("SDPA speed-up over eager (bias mask)", KernelCase("eager", bias=True), KernelCase("sdpa", bias=True))]
        pairs += [(f"differential, two calls / one wide call ({backend})", KernelCase(backend, calls=2),
                   KernelCase(backend, value_width=2)) for backend in backends]
        ratios += [{"name": name, "length": length, "value": by_case[slow] / by_case[fast]}
                   for name, slow, fast in pairs if slow in by_case and fast in by_case]
    return {
        "case_set": "kernels", "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "clock": clock, "min_run_time": min_run_time,
        "shape": {"batch": batch, "heads": heads, "head_dim": head_dim, "dtype": str(dtype)},
        "timings": results, "ratios": ratios,
    }


def kernel_markdown_report(result: dict) -> str:
    shape = result["shape"]
    lines = [
        "# Attention kernels alone (forward + backward)", "",
        f"Device: {result['device']} ({result['threads']} threads), torch {result['torch']}. Shape: batch "
        f"{shape['batch']} × {shape['heads']} heads × length × head dim {shape['head_dim']}, {shape['dtype']}. "
        f"Clock: {result['clock']} time; torch.utils.benchmark blocked autorange of {result['min_run_time']} s.", "",
        "| kernel | length | median ms | IQR ms | blocks |", "|---|---|---|---|---|",
    ]
    for timing in result["timings"]:
        if timing["error"]:
            lines.append(f"| {timing['label']} | {timing['length']} | unavailable: {timing['error']} | | |")
        else:
            lines.append(f"| {timing['label']} | {timing['length']} | {timing['median_ms']:.2f} | "
                         f"{timing['iqr_ms']:.2f} | {timing['blocks']} |")
    lines += ["", "| ratio | length | value |", "|---|---|---|"]
    lines += [f"| {ratio['name']} | {ratio['length']} | {ratio['value']:.2f}× |" for ratio in result["ratios"]]
    return "\n".join(lines) + "\n"
