"""Running the cases of `cases`: time, FLOPs and peak memory of a step, and the ratios between them.

Cases of one sequence length are timed together and interleaved: each round runs one step of every case,
in an order rotated per round, so slow drift of a shared machine spreads over all of them; the figure is
the median of the rounds after warm-up. On a GPU a step is timed with CUDA events; on a CPU with wall
time, or with this process's CPU time (`clock="cpu"`: waiting for a core on a shared machine is not
counted). `amp=True` runs forward and loss under bf16 autocast.

FLOPs per step are model FLOPs: counted once per model by `torch.utils.flop_counter.FlopCounterMode`
on one step of the same model at the eager backend, uncompiled, for one sequence times the batch (every
matmul, attention's included, backward included), so they do not depend on the kernel that runs them;
divided by the median time they give the achieved FLOP/s, and divided by the device's peak (`peak_tflops`,
or the table below for bf16 on known GPUs) the model FLOPs utilisation (MFU).

Peak memory is what a training step adds to a built model, over two steps (gradients, AdamW state,
activations), measured for each case alone. On a GPU: `torch.cuda.max_memory_allocated` minus the
allocation after building. On a CPU, a fresh process builds the model (and, for a forward, runs one
first, so a compiled kernel's one-off cost is left out), resets its resident-set high-water mark
(`/proc/self/clear_refs`), runs the steps and reports VmHWM minus the resident set before them. (`ru_maxrss` would be wrong here: a child inherits its parent's peak at fork.) It includes
allocator caching, so it bounds from above what the step needs, measured the same way for every case.

Kernel-only cases (`KernelCase`) time the attention kernel alone, forward and backward, with
`torch.utils.benchmark`: what a backend can gain at most, without the rest of a training step.

`points.run_points` measures `Point`s instead (the GPU suite): each case alone, in a process of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_posvariants
from hf_posvariants.attention import eager_attention_forward
from hf_posvariants.bias_route import BACKEND_BIAS, SCORE_FUNCTION_BACKENDS
from hf_posvariants.evaluation.bench.cases import (
    CASE_SETS,
    REFERENCE_BUILDERS,
    BenchShape,
    Case,
    KernelCase,
    Ratio,
    RatioSpec,
    deberta_buckets,
    kernel_cases,
)
from hf_posvariants.training.recipes import config_class_of


# ---- building and running one case ----------------------------------------------------------------

def build_model(case: Case, shape: BenchShape, max_length: int, device: str) -> torch.nn.Module:
    """A fresh model for a case, seeded so every run builds the same weights; its forward compiled for a
    compiled case."""
    model = _built_model(case, shape, max_length, device)
    if case.compiled:
        model.forward = torch.compile(model.forward)
    return model


def _built_model(case: Case, shape: BenchShape, max_length: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if case.source == "transformers":
        config = REFERENCE_BUILDERS[case.model_type](shape, max_length)
        for name, value in case.overrides:
            if not hasattr(config, name):
                raise ValueError(f"{case.model_type} has no config field {name!r} to override.")
            setattr(config, name, value)
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


TASKS = ("train", "forward", "generate")


class Runner:
    """A model with its optimizer and a fixed batch, ready to run one training step, forward, or greedy
    generation of `new_tokens` after the batch (the model is built for the batch's length plus those)."""

    def __init__(self, case: Case, shape: BenchShape, length: int, device: str, amp: bool = False,
                 new_tokens: int = 0):
        self.model = build_model(case, shape, length + new_tokens, device)
        self.device = device
        self.amp = amp
        self.new_tokens = new_tokens
        self.no_cache = {"use_cache": False} if case.head == "causal" else {}
        # Fused AdamW on a GPU, as a GPU training loop would run it; the CPU has no fused kernel.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.startswith("cuda") or None)
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

    @torch.inference_mode()
    def generate(self) -> None:
        """Greedy decoding of exactly `new_tokens` with the cache: its time over `new_tokens` is the time per token."""
        if not self.new_tokens:
            raise ValueError("task='generate' needs new_tokens > 0.")
        self.model.eval()
        with self.autocast():
            self.model.generate(self.input_ids, attention_mask=torch.ones_like(self.input_ids), do_sample=False,
                                max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, pad_token_id=0)

    def step(self, task: str) -> None:
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not supported; allowed values are {list(TASKS)}.")
        {"train": self.train_step, "forward": self.forward, "generate": self.generate}[task]()


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
    backend, whose attention is plain matmuls (fused kernels such as SDPA's on CPU have no FLOP formula),
    uncompiled, on one sequence of the batch: every operator counted is linear in the batch."""
    eager = dataclasses.replace(case, backend="eager", compiled=False)
    one = dataclasses.replace(shape, batch_size=1)
    return shape.batch_size * count_flops(Runner(eager, one, length, device, amp), task)


# The eager count materialises (heads, length, length) fp32 scores of one sequence, a few at a time: beyond this many
# bytes for one of them (16k tokens at 4 heads is 4 GiB) the count is skipped and FLOPs are reported as unknown.
FLOP_COUNT_SCORE_BYTES = 1 << 30


def eager_scores_fit(shape: BenchShape, length: int) -> bool:
    return shape.num_attention_heads * length * length * 4 <= FLOP_COUNT_SCORE_BYTES


@dataclass
class Timing:
    """The rounds of one case at one task and length, its peak memory and model FLOPs, or why it has none."""

    case: Case | KernelCase
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

    def mfu(self, peak_tflops: float | None) -> float | None:
        """Model FLOPs utilisation against `peak_tflops`; None without FLOPs, time or a peak."""
        achieved = self.achieved_tflops()
        return achieved / peak_tflops if achieved is not None and peak_tflops else None

    def as_dict(self, peak_tflops: float | None = None) -> dict:
        spread = (1000 * (max(self.seconds) - min(self.seconds))) if self.seconds else None
        achieved = self.achieved_tflops()
        return {
            "label": self.case.label, "case": asdict(self.case), "task": self.task, "length": self.length,
            "median_ms": self.median_ms, "spread_ms": spread, "rounds": len(self.seconds),
            "peak_memory_mib": self.peak_memory_mib, "flops_per_step": self.flops, "achieved_tflops": achieved,
            "mfu": self.mfu(peak_tflops), "error": self.error,
        }


def describe(error: BaseException) -> str:
    """An error as one short line for a result table: its type and the first line of its message."""
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}"


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
            eager = dataclasses.replace(timing.case, backend="eager", compiled=False)
            if eager not in flops and eager_scores_fit(shape, length):
                flops[eager] = model_flops(eager, shape, length, task, device, amp)
            timing.flops = flops.get(eager)
        except Exception as error:  # noqa: BLE001 — a backend that does not work here is a result
            timing.error = describe(error)
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
    code = "from hf_posvariants.evaluation.bench.measurement import memory_child; memory_child()"
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
        for task in TASKS:
            for spec in specs:
                if spec.length not in (None, length):
                    continue
                top = values.get((spec.metric, spec.numerator, task, length))
                bottom = values.get((spec.metric, spec.denominator, task, length))
                if top is None or bottom is None:
                    continue
                value = bottom / top if spec.target.startswith("≥") else top / bottom
                ratios.append(Ratio(spec.name, spec.numerator.label, spec.denominator.label, length, task, value,
                                    spec.target))
    return ratios


DEFAULT_LENGTHS = [128, 512]
DEFAULT_TASKS = ("train", "forward")


def run_benchmark(shape: BenchShape, lengths: list[int] | None, backends: list[str], warmup: int, rounds: int,
                  device: str, tasks: tuple[str, ...] | None = None, memory: bool = True,
                  families: list[str] | None = None, encodings: list[str] | None = None,
                  clock: str = "wall", case_set: str = "variants", amp: bool = False,
                  peak_tflops: float | None = None, log=print) -> dict:
    """Time, count and measure every case of `case_set`. Ratios "≥" are speed-ups (denominator time over
    numerator time), the others numerator over denominator. Lengths and tasks default to the case set's own
    (the lengths its ratios are pinned to, its tasks), else `DEFAULT_LENGTHS` and `DEFAULT_TASKS`."""
    if clock not in CLOCKS or (clock == "cpu" and device.startswith("cuda")):
        raise ValueError(f"clock={clock!r} is not supported on {device}; allowed values are "
                         f"{['wall'] if device.startswith('cuda') else list(CLOCKS)}.")
    if case_set not in CASE_SETS:
        raise ValueError(f"case_set={case_set!r} is not supported; allowed values are {sorted(CASE_SETS)}.")
    chosen = CASE_SETS[case_set](backends, families, encodings)
    lengths = lengths or chosen.pinned_lengths() or DEFAULT_LENGTHS
    tasks = tasks or chosen.tasks or DEFAULT_TASKS
    timings: list[Timing] = []
    for length in lengths:
        cases = chosen.cases_at(length)
        for task in tasks:
            log(f"timing {len(cases)} cases: {task} at length {length}")
            timings += time_cases(cases, shape, length, task, warmup, rounds, device, clock, amp)
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


# ---- kernel-only cases ------------------------------------------------------------------------------

class _KernelModule(torch.nn.Module):
    """What transformers' attention functions read from the calling layer."""

    num_key_value_groups = 1
    is_causal = True


def kernel_step(case: KernelCase, batch: int, heads: int, length: int, head_dim: int, device: str,
                dtype: torch.dtype) -> Callable[[], None]:
    """A closure running one forward + backward of the kernel on fixed random inputs (see `KERNEL_BIASES`)."""
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, grad: bool = True):
        return torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_(grad)

    query, key = tensor(batch, heads, length, head_dim), tensor(batch, heads, length, head_dim)
    value = tensor(batch, heads, length, head_dim * case.value_width)
    if case.backend in SCORE_FUNCTION_BACKENDS and case.bias not in ("mask", "learned_mask"):
        attend = flex_kernel(case, batch, heads, length, device, tensor)
    else:
        attend = masked_kernel(case, batch, heads, length, device, dtype, tensor)

    def step() -> None:
        outputs = [attend(query, key, value) for _ in range(case.calls)]
        sum(output.float().sum() for output in outputs).backward()

    return step


def masked_kernel(case: KernelCase, batch: int, heads: int, length: int, device: str, dtype: torch.dtype,
                  tensor: Callable[..., torch.Tensor]) -> Callable:
    """The backend through transformers' attention functions, the bias as an additive mask built in the step
    (so a learned bias's gradient flows back to its tensor)."""
    causal = torch.full((length, length), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)[None, None]
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(case.backend, eager_attention_forward)
    module = _KernelModule().train()
    if case.bias == "c2p_p2c":
        module.is_causal = False  # DeBERTa is an encoder
        c2p, p2c = deberta_terms(batch, heads, length, tensor)
        index = relative_index(length, device)[None, None].expand(batch, heads, length, length)

        def mask() -> torch.Tensor:
            return torch.gather(c2p, 3, index) + torch.gather(p2c, 3, index).transpose(-1, -2)
    elif case.bias in ("mask", "learned_mask"):
        bias = tensor(1, heads, length, length, grad=case.bias == "learned_mask")

        def mask() -> torch.Tensor:
            return causal + bias
    else:  # SDPA takes its causal fast path without a mask; our eager kernel needs one
        fixed = None if BACKEND_BIAS[case.backend].causal_without_mask else causal

        def mask() -> torch.Tensor | None:
            return fixed

    def attention(query, key, value):
        return attend(module, query, key, value, mask(), scaling=query.shape[-1] ** -0.5)[0]

    return attention


def deberta_terms(batch: int, heads: int, length: int, tensor: Callable[..., torch.Tensor]):
    """DeBERTa's content-to-position and position-to-content products, (B, H, T, 2 × span), needing gradients."""
    span = deberta_buckets(length)
    return tensor(batch, heads, length, 2 * span), tensor(batch, heads, length, 2 * span)


def relative_index(length: int, device: str) -> torch.Tensor:
    """DeBERTa's relative position of each (query, key) pair, clipped to the span, as an index into 2 × span."""
    span = deberta_buckets(length)
    positions = torch.arange(length, device=device)
    return (positions[:, None] - positions[None, :]).clamp(-span, span - 1) + span


def flex_kernel(case: KernelCase, batch: int, heads: int, length: int, device: str,
                tensor: Callable[..., torch.Tensor]) -> Callable:
    """torch's flex_attention, compiled, with the case's score function: under a causal block mask, except
    DeBERTa's terms (an encoder)."""
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = None
    if case.bias != "c2p_p2c":
        block_mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, length, length, device=device)
    score_mod = None
    if case.bias == "alibi":
        slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)], device=device)

        def score_mod(score, b, h, q, k):
            return score - slopes[h] * (q - k)
    elif case.bias == "t5_buckets":
        buckets = 32
        table = tensor(buckets, heads, grad=False).float().requires_grad_()
        positions = torch.arange(length, device=device)
        # a stand-in for T5's bucket of each pair: the distance, clipped to the table
        bucket = (positions[:, None] - positions[None, :]).clamp(0, buckets - 1)

        def score_mod(score, b, h, q, k):
            return score + table[bucket[q, k], h]
    elif case.bias == "t5_distances":
        table = tensor(heads, 2 * length - 1, grad=False).float().requires_grad_()

        def score_mod(score, b, h, q, k):
            return score + table[h, q - k + length - 1]
    elif case.bias == "c2p_p2c":
        c2p, p2c = deberta_terms(batch, heads, length, tensor)
        index = relative_index(length, device)

        def score_mod(score, b, h, q, k):
            return score + c2p[b, h, q, index[q, k]] + p2c[b, h, k, index[k, q]]
    kernel = compiled_flex(device)
    options = dict(case.kernel_options) or None

    def attention(query, key, value):
        return kernel(query, key, value, score_mod=score_mod, block_mask=block_mask, kernel_options=options)

    return attention


@functools.cache
def compiled_flex(device: str) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


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
                entry["error"] = describe(error)
            results.append(entry)
        pairs = [("SDPA speed-up over eager (causal)", KernelCase("eager"), KernelCase("sdpa")),
                 ("SDPA speed-up over eager (bias mask)", KernelCase("eager", "mask"), KernelCase("sdpa", "mask"))]
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
