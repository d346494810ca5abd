"""The GPU rows: every figure of the H100 baseline table (`../shared/gpu/baseline-h100.md` beside the project)
re-measured in one command, each case in a process of its own, as one table of ratios.

Rows: our Llama-block family against transformers' Llama (SDPA and eager), every bias encoding and the
absolute ones against RoPE, flex attention for training at 8 × 2048, forward at 16k and 64k tokens, DeBERTa
against DebertaV2 and BERT, differential attention against DiffLlama, torch.compile (MFU compiled and not),
generation time per token, and the attention kernels alone. `GPU_SIZES` are the baseline's; `TINY_SIZES`
run the same suite on a CPU in seconds (the dry run the tests keep alive while no GPU is lent).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass

import torch
import transformers

from hf_posvariants import POSITION_ENCODINGS
from hf_posvariants.evaluation.bench.cases import (
    LLAMA_BLOCK,
    BenchShape,
    Case,
    KernelCase,
    Point,
    PointRatio,
    encodings_of_kind,
    families_declaring,
    families_with,
    reference_case,
)
from hf_posvariants.evaluation.bench.measurement import PointTiming, device_peak_tflops, run_points


@dataclass(frozen=True)
class SuiteSizes:
    """The shapes and lengths of the suite. `decoder`: the ~125M Llama-block models; `encoder`: DeBERTa base;
    kernel rows take their batch and heads from the same shapes. `timeout_s` bounds one point, `compiled_timeout_s`
    one that compiles (torch.compile, flex)."""

    decoder: BenchShape
    encoder: BenchShape
    train_length: int
    encoder_length: int
    long_lengths: tuple[int, int]
    prompt_length: int
    new_tokens: int
    timeout_s: float
    compiled_timeout_s: float


GPU_SIZES = SuiteSizes(
    decoder=BenchShape(768, 12, 12, 2048, 32000, 8), encoder=BenchShape(768, 12, 12, 3072, 32000, 16),
    train_length=2048, encoder_length=512, long_lengths=(16384, 65536), prompt_length=128, new_tokens=64,
    timeout_s=90, compiled_timeout_s=240,
)
TINY_SIZES = SuiteSizes(
    decoder=BenchShape(32, 2, 4, 64, 97, 2), encoder=BenchShape(32, 2, 4, 64, 97, 2),
    train_length=32, encoder_length=32, long_lengths=(64, 128), prompt_length=8, new_tokens=4,
    timeout_s=60, compiled_timeout_s=60,
)
# Flex blocks that fit Hopper's shared memory when a score function reads a learned table (the defaults asked
# for 245,760 of 232,448 bytes for T5 at 8 × 2048 × 64).
SMALL_FLEX_BLOCKS = (("BLOCK_M", 64), ("BLOCK_N", 64), ("num_stages", 2))


def gpu_suite(sizes: SuiteSizes = GPU_SIZES) -> tuple[list[Point], list[PointRatio]]:
    """The points, cheapest and most asked-for first (a spent time budget cuts the last), and their ratios."""
    points: list[Point] = []
    ratios: list[PointRatio] = []

    def point(case: Case | KernelCase, shape: BenchShape, length: int, task: str, new_tokens: int = 0) -> Point:
        compiles = getattr(case, "compiled", False) or case.backend == "flex_attention"
        made = Point(case, shape, length, task, new_tokens,
                     sizes.compiled_timeout_s if compiles else sizes.timeout_s)
        if made not in points:
            points.append(made)
        return made

    def compare(name: str, numerator: Point, denominator: Point) -> None:
        ratios.append(PointRatio(name, numerator, denominator))

    llama = families_with(**LLAMA_BLOCK)[0]
    rope = encodings_of_kind("rotary")[0]
    decoder, train = sizes.decoder, sizes.train_length
    biases = [name for name in ("alibi", "t5_bias") if name in POSITION_ENCODINGS]

    def ours(encoding: str, backend: str = "sdpa", **options) -> Case:
        return Case("ours", llama, "causal", backend, encoding, **options)

    def hf_llama(backend: str = "sdpa", **options) -> Case:
        return dataclasses.replace(reference_case("LlamaForCausalLM", "causal", backend), **options)

    # training step at 8 × 2048, SDPA and eager
    hf_sdpa, rope_sdpa = point(hf_llama(), decoder, train, "train"), point(ours(rope), decoder, train, "train")
    compare(f"{llama} {rope} / Llama, training (SDPA)", rope_sdpa, hf_sdpa)
    for encoding in biases + [name for name in ("nope", "sinusoidal", "learned") if name in POSITION_ENCODINGS]:
        compare(f"{encoding} / {rope}, training (SDPA)", point(ours(encoding), decoder, train, "train"), rope_sdpa)
    compare("Llama eager / SDPA, training", point(hf_llama("eager"), decoder, train, "train"), hf_sdpa)
    compare(f"{llama} {rope} eager / SDPA, training", point(ours(rope, "eager"), decoder, train, "train"), rope_sdpa)

    # differential attention, same size
    differential = families_with(attention_variant="differential")[:1]
    if differential:
        diffllama = point(reference_case("DiffLlamaForCausalLM", "causal", "sdpa"), decoder, train, "train")
        pairs = point(Case("ours", differential[0], "causal", "sdpa"), decoder, train, "train")
        halves = point(Case("ours", differential[0], "causal", "sdpa",
                            overrides=(("differential_head_layout", "halves"),)), decoder, train, "train")
        compare(f"{differential[0]} (pairs) / DiffLlama, training (SDPA)", pairs, diffllama)
        compare(f"{differential[0]} (halves) / DiffLlama, training (SDPA)", halves, diffllama)
        compare(f"{differential[0]} / {llama} {rope}, training (SDPA)", pairs, rope_sdpa)

    # DeBERTa base, masked LM at 16 × 512, its Enhanced Mask Decoder off unless said
    relative = families_declaring("position_buckets")[:1]
    encoder, encoder_length = sizes.encoder, sizes.encoder_length
    if relative:
        def deberta(backend: str, emd: int) -> Point:
            case = Case("ours", relative[0], "masked", backend, overrides=(("emd_layers", emd),))
            return point(case, encoder, encoder_length, "train")

        debertav2 = point(reference_case("DebertaV2ForMaskedLM", "masked", "sdpa"), encoder, encoder_length, "train")
        bert = point(reference_case("BertForMaskedLM", "masked", "sdpa"), encoder, encoder_length, "train")
        compare(f"{relative[0]} SDPA / DebertaV2, training", deberta("sdpa", 0), debertav2)
        compare(f"{relative[0]} eager / DebertaV2, training", deberta("eager", 0), debertav2)
        compare(f"{relative[0]} SDPA with 2 EMD layers / DebertaV2, training", deberta("sdpa", 2), debertav2)
        compare(f"{relative[0]} SDPA / BERT SDPA, training", deberta("sdpa", 0), bert)

    # forward at long lengths, batch 1: biases materialised on SDPA (the shorter length only) and on flex
    single = dataclasses.replace(decoder, batch_size=1)
    for index, length in enumerate(sizes.long_lengths):
        rope_long = point(ours(rope), single, length, "forward")
        for encoding in biases:
            backends = ("sdpa", "flex_attention") if index == 0 else ("flex_attention",)
            for backend in backends:
                compare(f"{encoding} on {backend} / {rope}, forward at {length:,}",
                        point(ours(encoding, backend), single, length, "forward"), rope_long)

    # generation, batch 1, greedy with the cache
    prompt, new = sizes.prompt_length, sizes.new_tokens
    hf_generate = point(hf_llama(), single, prompt, "generate", new)
    for encoding in [rope] + biases[:1]:
        compare(f"{llama} {encoding} / Llama, generate per token", point(ours(encoding), single, prompt, "generate", new),
                hf_generate)

    # flex attention for training at 8 × 2048
    for encoding in [rope] + biases:
        compare(f"{encoding} on flex / {rope} on SDPA, training",
                point(ours(encoding, "flex_attention"), decoder, train, "train"), rope_sdpa)

    # the attention kernels alone, forward + backward
    flash = point(KernelCase("sdpa"), decoder, train, "kernel")
    kernel_rows = [("SDPA, a bias needing a gradient", KernelCase("sdpa", "learned_mask")),
                   ("flex, no score function", KernelCase("flex_attention")),
                   ("flex, ALiBi", KernelCase("flex_attention", "alibi")),
                   ("flex, T5 per-distance table", KernelCase("flex_attention", "t5_distances",
                                                               kernel_options=SMALL_FLEX_BLOCKS)),
                   ("flex, T5 bucket table", KernelCase("flex_attention", "t5_buckets",
                                                         kernel_options=SMALL_FLEX_BLOCKS))]
    for name, case in kernel_rows:
        compare(f"kernel: {name} / SDPA flash", point(case, decoder, train, "kernel"), flash)
    plain = point(KernelCase("sdpa"), encoder, encoder_length, "kernel")
    compare("kernel: DeBERTa terms gathered + SDPA / SDPA without bias",
            point(KernelCase("sdpa", "c2p_p2c"), encoder, encoder_length, "kernel"), plain)
    compare("kernel: DeBERTa terms in a flex score function / SDPA without bias",
            point(KernelCase("flex_attention", "c2p_p2c", kernel_options=SMALL_FLEX_BLOCKS), encoder, encoder_length,
                  "kernel"), plain)

    # torch.compile of the whole forward: MFU compiled and not
    hf_compiled = point(hf_llama(compiled=True), decoder, train, "train")
    rope_compiled = point(ours(rope, compiled=True), decoder, train, "train")
    compare("Llama compiled / not, training (SDPA)", hf_compiled, hf_sdpa)
    compare(f"{llama} {rope} compiled / Llama compiled, training (SDPA)", rope_compiled, hf_compiled)
    for encoding in biases[1:]:
        compare(f"{encoding} compiled / {rope} compiled, training (SDPA)",
                point(ours(encoding, compiled=True), decoder, train, "train"), rope_compiled)
    return points, ratios


def suite_ratios(ratios: list[PointRatio], timings: list[PointTiming]) -> list[dict]:
    """Time and memory of each ratio's two points as measured, or the error that left a side without a figure."""
    by_point = {timing.point: timing for timing in timings}
    rows = []
    for ratio in ratios:
        top, bottom = by_point[ratio.numerator], by_point[ratio.denominator]

        def quotient(a: float | None, b: float | None) -> float | None:
            return a / b if a is not None and b else None

        rows.append({
            "name": ratio.name, "numerator": ratio.numerator.label, "denominator": ratio.denominator.label,
            "time": quotient(top.median_ms, bottom.median_ms),
            "memory": quotient(top.peak_memory_mib, bottom.peak_memory_mib),
            "numerator_error": top.error, "denominator_error": bottom.error,
        })
    return rows


def run_gpu_suite(device: str = "cuda", sizes: SuiteSizes = GPU_SIZES, amp: bool = True, warmup: int = 2,
                  rounds: int = 5, compile: bool = True, jobs: int = 1, budget_s: float | None = 480,
                  peak_tflops: float | None = None, start_method: str = "forkserver", log=print) -> dict:
    """Every point of `gpu_suite(sizes)` in its own process, and the ratios (see `run_points`)."""
    points, ratios = gpu_suite(sizes)
    begin = time.monotonic()
    timings = run_points(points, device, amp, warmup, rounds, compile, jobs, budget_s, start_method, log)
    seconds = time.monotonic() - begin
    peak = device_peak_tflops(device, amp, peak_tflops)
    return {
        "case_set": "gpu", "device": torch.cuda.get_device_name() if device.startswith("cuda") else device, "torch": torch.__version__, "transformers": transformers.__version__,
        "precision": "bf16 autocast" if amp else "fp32", "compile": compile, "warmup": warmup, "rounds": rounds,
        "sizes": asdict(sizes), "peak_tflops": peak, "seconds": seconds,
        "memory_method": "cuda.max_memory_allocated minus the built model" if device.startswith("cuda")
        else "VmHWM minus the resident set with the model built",
        "timings": [timing.as_dict(peak) for timing in timings],
        "ratios": suite_ratios(ratios, timings),
    }
