"""Speed and memory of every variant against transformers' own models, measured in one run.

A *case* is one model at one backend: ours (family × position encoding × attention variant) or a
reference model from transformers built at the same width, depth and vocabulary. Cases of one
sequence length are timed together and interleaved: each round runs one step of every case, in an
order rotated per round, so slow drift of a shared machine spreads over all of them; the figure is
the median of the rounds after warm-up.

Peak memory is measured for each case alone. On a GPU it is `torch.cuda.max_memory_allocated`
over one training step of a fresh model (parameters, gradients, AdamW state, activations). On a
CPU a fresh process builds the model and runs two steps; its peak resident set size (VmHWM
from /proc/self/status, not `ru_maxrss`, which a child inherits from its parent's peak at fork)
minus that of a process which only imports the same libraries is reported. It includes allocator caching, so it is an upper bound of what the step
needs, measured the same way for every case.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config, LlamaConfig, MptConfig

import hf_posvariants
from hf_posvariants import FAMILIES, POSITION_ENCODINGS
from hf_posvariants.position_encodings import selectable_position_encodings
from hf_posvariants.attention import ATTENTION_VARIANTS


@dataclass(frozen=True)
class BenchShape:
    """The shared size of every model in one run."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    vocab_size: int = 2048
    batch_size: int = 4

    def __post_init__(self):
        if self.intermediate_size % self.hidden_size:
            raise ValueError(
                f"intermediate_size={self.intermediate_size} must be a multiple of hidden_size={self.hidden_size}: "
                "MPT, one of the reference models, only takes an integer expansion ratio."
            )


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


def family_config_classes() -> dict[str, type]:
    return {config_class.model_type: config_class for config_class in FAMILIES}


# transformers' own models and the case of ours built to match each: same block type, norm position,
# activation, position scheme and tying, so the ratio compares implementations, not architectures.
def _llama(shape: BenchShape, max_length: int, config_class=LlamaConfig):
    return config_class(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads, max_position_embeddings=max_length, tie_word_embeddings=False,
    )


def _gpt2(shape: BenchShape, max_length: int):
    return GPT2Config(
        vocab_size=shape.vocab_size, n_embd=shape.hidden_size, n_inner=shape.intermediate_size,
        n_layer=shape.num_hidden_layers, n_head=shape.num_attention_heads, n_positions=max_length,
        activation_function="gelu", bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def _bert(shape: BenchShape, max_length: int):
    return BertConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        max_position_embeddings=max_length, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def _mpt(shape: BenchShape, max_length: int):
    return MptConfig(
        vocab_size=shape.vocab_size, d_model=shape.hidden_size, n_layers=shape.num_hidden_layers,
        n_heads=shape.num_attention_heads, expansion_ratio=shape.intermediate_size // shape.hidden_size,
        max_seq_len=max_length, no_bias=True,
    )


def _diffllama(shape: BenchShape, max_length: int):
    return _llama(shape, max_length, transformers.DiffLlamaConfig)


def deberta_buckets(max_length: int) -> int:
    """DeBERTa-v3's 256 log buckets, shrunk to fit the relative span of short benchmark lengths."""
    return min(256, max_length // 2)


def _deberta_v2(shape: BenchShape, max_length: int):
    return transformers.DebertaV2Config(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        max_position_embeddings=max_length, relative_attention=True, position_buckets=deberta_buckets(max_length),
        pos_att_type=["p2c", "c2p"], position_biased_input=False, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@dataclass(frozen=True)
class Reference:
    """A transformers model (built by `REFERENCE_BUILDERS[name]`) and the case of ours that mirrors it."""

    name: str
    head: str
    ours: Case


def references(backend: str) -> list[Reference]:
    """The pairs that exist with the families and attention variants registered right now."""
    pre_ln_gelu = (("norm_position", "pre"), ("hidden_act", "gelu"), ("scale_embeddings", False))
    no_biases = (("attention_bias", False), ("mlp_bias", False))
    found = [
        Reference("LlamaForCausalLM", "causal", Case("ours", "posvar_llama", "causal", backend, "rope")),
        Reference("GPT2LMHeadModel", "causal",
                  Case("ours", "posvar_transformer", "causal", backend, "learned", overrides=pre_ln_gelu)),
        Reference("BertForMaskedLM", "masked", Case("ours", "posvar_transformer", "masked", backend, "learned",
                                                    overrides=(("scale_embeddings", False),))),
        Reference("MptForCausalLM", "causal",
                  Case("ours", "posvar_transformer", "causal", backend, "alibi", overrides=pre_ln_gelu + no_biases)),
    ]
    if "differential" in ATTENTION_VARIANTS:
        differential = [name for name, cls in family_config_classes().items() if cls.attention_variant == "differential"]
        ours = (Case("ours", differential[0], "causal", backend, "rope") if differential
                else Case("ours", "posvar_llama", "causal", backend, "rope", "differential"))
        found.append(Reference("DiffLlamaForCausalLM", "causal", ours))
    deberta = [name for name in family_config_classes() if "deberta" in name]
    if deberta:
        # transformers' DeBERTa-v2 MLM head has no Enhanced Mask Decoder: compare like with like.
        found.append(Reference("DebertaV2ForMaskedLM", "masked",
                               Case("ours", deberta[0], "masked", backend, overrides=(("emd_layers", 0),))))
    return found


# name → (config builder, model class name in transformers; imported lazily since some are optional)
REFERENCE_BUILDERS = {
    "LlamaForCausalLM": _llama,
    "GPT2LMHeadModel": _gpt2,
    "BertForMaskedLM": _bert,
    "MptForCausalLM": _mpt,
    "DiffLlamaForCausalLM": _diffllama,
    "DebertaV2ForMaskedLM": _deberta_v2,
}


def reference_case(reference: Reference, backend: str) -> Case:
    return Case("transformers", reference.name, reference.head, backend)


def variant_fits(variant: str, config_class: type) -> bool:
    """Whether the attention variant runs on the family's default config (DeBERTa's needs DeBERTa's fields)."""
    try:
        ATTENTION_VARIANTS[variant].validate_config(config_class())
    except ValueError:
        return False
    return True


def variant_cases(backends: list[str], families: list[str] | None = None,
                  encodings: list[str] | None = None) -> list[Case]:
    """Every family × position encoding (causal head) at every backend, plus every attention variant
    that is not the family's default, with the family's default encoding."""
    cases = []
    for model_type, config_class in family_config_classes().items():
        if families and model_type not in families:
            continue
        for backend in backends:
            for encoding in sorted(selectable_position_encodings()):
                if encodings and encoding not in encodings:
                    continue
                cases.append(Case("ours", model_type, "causal", backend, encoding))
            for variant in sorted(ATTENTION_VARIANTS):
                if variant != config_class.attention_variant and variant_fits(variant, config_class):
                    cases.append(Case("ours", model_type, "causal", backend, None, variant))
    return cases


def build_model(case: Case, shape: BenchShape, max_length: int, device: str) -> torch.nn.Module:
    """A fresh model for a case, seeded so every run builds the same weights."""
    torch.manual_seed(0)
    if case.source == "transformers":
        config = REFERENCE_BUILDERS[case.model_type](shape, max_length)
        model_class = getattr(transformers, case.model_type)
        backend = "eager" if case.model_type == "DebertaV2ForMaskedLM" else case.backend  # eager-only upstream
        return model_class._from_config(config, attn_implementation=backend).to(device)
    config_class = family_config_classes()[case.model_type]
    fields = dict(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads, max_position_embeddings=max_length,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    if case.position_encoding:
        fields["position_encoding"] = case.position_encoding
    if case.attention_variant:
        fields["attention_variant"] = case.attention_variant
    if "deberta" in case.model_type:
        fields["position_buckets"] = deberta_buckets(max_length)
    fields.update(dict(case.overrides))
    auto_class = AutoModelForCausalLM if case.head == "causal" else AutoModelForMaskedLM
    return auto_class.from_config(config_class(**fields), attn_implementation=case.backend).to(device)


class Runner:
    """A model with its optimizer and a fixed batch, ready to run one training step or forward."""

    def __init__(self, case: Case, shape: BenchShape, length: int, device: str):
        self.model = build_model(case, shape, length, device)
        self.no_cache = {"use_cache": False} if case.head == "causal" else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(3, shape.vocab_size, (shape.batch_size, length), generator=generator).to(device)

    def train_step(self) -> None:
        self.model.train()
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids, **self.no_cache).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def forward(self) -> None:
        self.model.eval()
        self.model(input_ids=self.input_ids, **self.no_cache)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    case: Case
    task: str
    length: int
    seconds: list[float] = field(default_factory=list)
    error: str | None = None
    peak_memory_mib: float | None = None

    @property
    def median_ms(self) -> float | None:
        return 1000 * statistics.median(self.seconds) if self.seconds else None

    def as_dict(self) -> dict:
        spread = (1000 * (max(self.seconds) - min(self.seconds))) if self.seconds else None
        return {
            "label": self.case.label, "case": asdict(self.case), "task": self.task, "length": self.length,
            "median_ms": self.median_ms, "spread_ms": spread, "rounds": len(self.seconds),
            "peak_memory_mib": self.peak_memory_mib, "error": self.error,
        }


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_cases(cases: list[Case], shape: BenchShape, length: int, task: str, warmup: int, rounds: int,
               device: str, clock: str = "wall") -> list[Timing]:
    """Interleaved timing of one task at one length; a case that cannot be built or run is recorded
    with its error (e.g. flex attention without a compiler) instead of stopping the run."""
    timings = [Timing(case, task, length) for case in cases]
    runners: dict[int, Runner] = {}
    for index, timing in enumerate(timings):
        try:
            runners[index] = Runner(timing.case, shape, length, device)
            for _ in range(warmup):
                step(runners[index], task)
        except Exception as error:  # noqa: BLE001 — a backend that does not work here is a result
            timing.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            runners.pop(index, None)
    now = CLOCKS[clock]
    order = list(runners)
    for round_index in range(rounds):
        shift = round_index % max(len(order), 1)
        for index in order[shift:] + order[:shift]:
            synchronize(device)
            start = now()
            step(runners[index], task)
            synchronize(device)
            timings[index].seconds.append(now() - start)
    return timings


def step(runner: Runner, task: str) -> None:
    runner.train_step() if task == "train" else runner.forward()


# ---- peak memory --------------------------------------------------------------------------------

def peak_memory_mib(case: Case, shape: BenchShape, length: int, task: str, device: str) -> float:
    if device.startswith("cuda"):
        runner = Runner(case, shape, length, device)
        step(runner, task)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(runner, task)
        peak = torch.cuda.max_memory_allocated() / 2**20
        del runner
        torch.cuda.empty_cache()
        return peak
    return _child_peak_rss(case, shape, length, task) - _child_peak_rss(None, shape, length, task)


_BASELINE_RSS: dict[str, float] = {}


def _child_peak_rss(case: Case | None, shape: BenchShape, length: int, task: str) -> float:
    """Peak RSS (MiB) of a fresh interpreter that imports our libraries and, given a case, runs two steps."""
    if case is None and "baseline" in _BASELINE_RSS:
        return _BASELINE_RSS["baseline"]
    payload = json.dumps({"case": asdict(case) if case else None, "shape": asdict(shape), "length": length, "task": task})
    package_root = str(Path(hf_posvariants.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    code = "from hf_posvariants.evaluation.bench import memory_child; memory_child()"
    result = subprocess.run([sys.executable, "-c", code, payload], env=env, capture_output=True, text=True, check=True)
    peak = float(result.stdout.strip().splitlines()[-1])
    if case is None:
        _BASELINE_RSS["baseline"] = peak
    return peak


def memory_child() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    if spec["case"] is not None:
        case = Case(**{**spec["case"], "overrides": tuple(tuple(item) for item in spec["case"]["overrides"])})
        runner = Runner(case, BenchShape(**spec["shape"]), spec["length"], "cpu")
        step(runner, spec["task"])
        step(runner, spec["task"])
    print(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident set. Linux's VmHWM belongs to the address space made at exec;
    ru_maxrss would also count the parent's peak at fork time, which a child inherits."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


# ---- ratios for the speed targets --------------------------------------------------------

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


def compute_ratios(timings: list[Timing]) -> list[Ratio]:
    by_key = {(t.case.label, t.task, t.length): t.median_ms for t in timings}
    lengths = sorted({t.length for t in timings})
    ratios: list[Ratio] = []

    def add(name, numerator, denominator, length, task, target, invert=False):
        top, bottom = by_key.get((numerator, task, length)), by_key.get((denominator, task, length))
        if top is None or bottom is None:
            return
        value = bottom / top if invert else top / bottom
        ratios.append(Ratio(name, numerator, denominator, length, task, value, target))

    for length in lengths:
        for task in ("train", "forward"):
            for backend in ("sdpa", "eager"):
                for reference in references(backend):
                    add(f"ours / {reference.name} time ({backend})", reference.ours.label,
                        reference_case(reference, backend).label, length, task,
                        "≤1.00×" if reference.name == "LlamaForCausalLM" else "≤1.15×")
            for encoding in sorted(selectable_position_encodings()):
                if POSITION_ENCODINGS[encoding].kind == "bias":
                    continue
                label = f"posvar_llama/{encoding}"
                add(f"SDPA speed-up over eager ({encoding})", f"{label}@sdpa", f"{label}@eager", length, task,
                    "≥2.00×", invert=True)
            for encoding in ("alibi", "t5_bias"):
                add(f"{encoding} / rope time (sdpa)", f"posvar_llama/{encoding}@sdpa", "posvar_llama/rope@sdpa",
                    length, task, "≤1.15×")
    return ratios


# ---- the whole run ----------------------------------------------------------------------------

def run_benchmark(shape: BenchShape, lengths: list[int], backends: list[str], warmup: int, rounds: int,
                  device: str, tasks: tuple[str, ...] = ("train", "forward"), memory: bool = True,
                  families: list[str] | None = None, encodings: list[str] | None = None,
                  clock: str = "wall", log=print) -> dict:
    """`clock="cpu"` times each step by the CPU time of this process instead of wall time: on a CPU
    shared with other jobs, time spent waiting for a core is then not counted (use one thread)."""
    if clock not in CLOCKS or (clock == "cpu" and device.startswith("cuda")):
        raise ValueError(f"clock={clock!r} is not supported on {device}; allowed values are "
                         f"{['wall'] if device.startswith('cuda') else list(CLOCKS)}.")
    cases = variant_cases(backends, families, encodings)
    for backend in backends:
        for reference in references(backend):
            for candidate in (reference.ours, reference_case(reference, backend)):
                if candidate not in cases:
                    cases.append(candidate)
    timings: list[Timing] = []
    for length in lengths:
        for task in tasks:
            log(f"timing {len(cases)} cases: {task} at length {length}")
            timings += time_cases(cases, shape, length, task, warmup, rounds, device, clock)
    if memory:
        log("measuring peak memory, one case at a time")
        for timing in timings:
            if timing.error is None and timing.task == "train":
                timing.peak_memory_mib = peak_memory_mib(timing.case, shape, timing.length, timing.task, device)
    return {
        "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": asdict(shape), "lengths": lengths, "warmup": warmup, "rounds": rounds, "clock": clock,
        "memory_method": "cuda.max_memory_allocated" if device.startswith("cuda")
        else "peak RSS of a fresh process running 2 steps minus that of an idle one",
        "timings": [t.as_dict() for t in timings],
        "ratios": [asdict(r) | {"passes": r.passes()} for r in compute_ratios(timings)],
    }


def markdown_report(result: dict) -> str:
    shape = result["shape"]
    lines = [
        "# Speed and memory", "",
        f"Device: {result['device']} ({result['threads']} threads), torch {result['torch']}, transformers "
        f"{result['transformers']}. Shape: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads, intermediate {shape['intermediate_size']}, vocab "
        f"{shape['vocab_size']}, batch {shape['batch_size']}. Clock: {result['clock']} time. "
        f"Median of {result['rounds']} interleaved rounds "
        f"after {result['warmup']} warm-up steps. Memory: {result['memory_method']}.", "",
        "## Ratios (measured in this run)", "",
        "| ratio | length | task | value | target | meets |", "|---|---|---|---|---|---|",
    ]
    for ratio in result["ratios"]:
        meets = {True: "yes", False: "no", None: "–"}[ratio["passes"]]
        lines.append(f"| {ratio['name']} | {ratio['length']} | {ratio['task']} | {ratio['value']:.2f}× | "
                     f"{ratio['target']} | {meets} |")
    lines += ["", "## Every case", "", "| case | task | length | median ms | spread ms | peak MiB |",
              "|---|---|---|---|---|---|"]
    for timing in result["timings"]:
        if timing["error"]:
            lines.append(f"| {timing['label']} | {timing['task']} | {timing['length']} | unavailable: "
                         f"{timing['error']} | | |")
            continue
        memory = f"{timing['peak_memory_mib']:.0f}" if timing["peak_memory_mib"] is not None else ""
        lines.append(f"| {timing['label']} | {timing['task']} | {timing['length']} | {timing['median_ms']:.1f} | "
                     f"{timing['spread_ms']:.1f} | {memory} |")
    return "\n".join(lines) + "\n"
