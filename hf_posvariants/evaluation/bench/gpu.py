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
from dataclasses import asdict, dataclass
from pathlib import Path

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
from hf_posvariants.evaluation.bench.measurement import device_peak_tflops
from hf_posvariants.evaluation.bench.points import PointTiming, run_points


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


class _Suite:
    """The ratios of the suite as they are added, by row group."""

    def __init__(self, sizes: SuiteSizes):
        self.sizes = sizes
        self.ratios: dict[str, list[PointRatio]] = {}
        self.group = ""
        self.llama = families_with(**LLAMA_BLOCK)[0]
        self.rope = encodings_of_kind("rotary")[0]
        self.biases = [name for name in ("alibi", "t5_bias") if name in POSITION_ENCODINGS]
        self.single = dataclasses.replace(sizes.decoder, batch_size=1)

    def point(self, case: Case | KernelCase, shape: BenchShape, length: int, task: str, new_tokens: int = 0) -> Point:
        made = Point(case, shape, length, task, new_tokens)
        return dataclasses.replace(made, timeout_s=self.sizes.compiled_timeout_s if made.compiles
                                   else self.sizes.timeout_s)

    def train(self, case: Case) -> Point:
        return self.point(case, self.sizes.decoder, self.sizes.train_length, "train")

    def kernel(self, case: KernelCase, shape: BenchShape, length: int) -> Point:
        return self.point(case, shape, length, "kernel")

    def compare(self, name: str, numerator: Point, denominator: Point) -> None:
        self.ratios.setdefault(self.group, []).append(PointRatio(name, numerator, denominator))

    def points(self) -> list[Point]:
        """Each point once, the groups taking turns: the first ratio of every group, then the second of every
        group, and so on, so a spent budget leaves every group with its first rows (a ratio's denominator comes
        before its numerator)."""
        ordered: list[Point] = []
        for rank in range(max(map(len, self.ratios.values()), default=0)):
            for ratios in self.ratios.values():
                for point in (ratios[rank].denominator, ratios[rank].numerator) if rank < len(ratios) else ():
                    if point not in ordered:
                        ordered.append(point)
        return ordered

    def ours(self, encoding: str, backend: str = "sdpa", **options) -> Case:
        return Case("ours", self.llama, "causal", backend, encoding, **options)

    @staticmethod
    def hf_llama(backend: str = "sdpa", **options) -> Case:
        return dataclasses.replace(reference_case("LlamaForCausalLM", "causal", backend), **options)

    def decoder_rows(self) -> None:
        """Training at 8 × 2048: ours against Llama, every bias and absolute encoding against RoPE, eager."""
        hf_sdpa, rope_sdpa = self.train(self.hf_llama()), self.train(self.ours(self.rope))
        self.compare(f"{self.llama} {self.rope} / Llama, training (SDPA)", rope_sdpa, hf_sdpa)
        absolute = [name for name in ("nope", "sinusoidal", "learned") if name in POSITION_ENCODINGS]
        for encoding in self.biases + absolute:
            self.compare(f"{encoding} / {self.rope}, training (SDPA)", self.train(self.ours(encoding)), rope_sdpa)
        self.compare("Llama eager / SDPA, training", self.train(self.hf_llama("eager")), hf_sdpa)
        self.compare(f"{self.llama} {self.rope} eager / SDPA, training",
                     self.train(self.ours(self.rope, "eager")), rope_sdpa)

    def differential_rows(self) -> None:
        differential = families_with(attention_variant="differential")[:1]
        if not differential:
            return
        diffllama = self.train(reference_case("DiffLlamaForCausalLM", "causal", "sdpa"))
        pairs = self.train(Case("ours", differential[0], "causal", "sdpa"))
        halves = self.train(Case("ours", differential[0], "causal", "sdpa",
                                 overrides=(("differential_head_layout", "halves"),)))
        self.compare(f"{differential[0]} (pairs) / DiffLlama, training (SDPA)", pairs, diffllama)
        self.compare(f"{differential[0]} (halves) / DiffLlama, training (SDPA)", halves, diffllama)
        self.compare(f"{differential[0]} / {self.llama} {self.rope}, training (SDPA)", pairs,
                     self.train(self.ours(self.rope)))

    def deberta_rows(self) -> None:
        """DeBERTa base, masked LM at 16 × 512, its Enhanced Mask Decoder off unless said."""
        relative = families_declaring("position_buckets")[:1]
        if not relative:
            return
        encoder, length = self.sizes.encoder, self.sizes.encoder_length

        def ours(backend: str, emd: int) -> Point:
            case = Case("ours", relative[0], "masked", backend, overrides=(("emd_layers", emd),))
            return self.point(case, encoder, length, "train")

        debertav2 = self.point(reference_case("DebertaV2ForMaskedLM", "masked", "sdpa"), encoder, length, "train")
        bert = self.point(reference_case("BertForMaskedLM", "masked", "sdpa"), encoder, length, "train")
        self.compare(f"{relative[0]} SDPA / DebertaV2, training", ours("sdpa", 0), debertav2)
        self.compare(f"{relative[0]} eager / DebertaV2, training", ours("eager", 0), debertav2)
        self.compare(f"{relative[0]} SDPA with 2 EMD layers / DebertaV2, training", ours("sdpa", 2), debertav2)
        self.compare(f"{relative[0]} SDPA / BERT SDPA, training", ours("sdpa", 0), bert)

    def long_forward_rows(self) -> None:
        """Forward at long lengths, batch 1: biases materialised on SDPA (the shorter length only) and on flex."""
        for index, length in enumerate(self.sizes.long_lengths):
            rope = self.point(self.ours(self.rope), self.single, length, "forward")
            for encoding in self.biases:
                for backend in ("sdpa", "flex_attention") if index == 0 else ("flex_attention",):
                    self.compare(f"{encoding} on {backend} / {self.rope}, forward at {length:,}",
                                 self.point(self.ours(encoding, backend), self.single, length, "forward"), rope)

    def generate_rows(self) -> None:
        """Greedy generation with the cache, batch 1."""
        prompt, new = self.sizes.prompt_length, self.sizes.new_tokens
        llama = self.point(self.hf_llama(), self.single, prompt, "generate", new)
        for encoding in [self.rope] + self.biases[:1]:
            self.compare(f"{self.llama} {encoding} / Llama, generate per token",
                         self.point(self.ours(encoding), self.single, prompt, "generate", new), llama)

    def flex_training_rows(self) -> None:
        for encoding in [self.rope] + self.biases:
            self.compare(f"{encoding} on flex / {self.rope} on SDPA, training",
                         self.train(self.ours(encoding, "flex_attention")), self.train(self.ours(self.rope)))

    def compiled_rows(self) -> None:
        """torch.compile of the whole forward: MFU compiled and not, of Llama and of ours (the compile itself
        is done ahead by a precompile process; its seconds are reported apart from the step's)."""
        hf_compiled = self.train(self.hf_llama(compiled=True))
        rope_compiled = self.train(self.ours(self.rope, compiled=True))
        self.compare("Llama compiled / not, training (SDPA)", hf_compiled, self.train(self.hf_llama()))
        self.compare(f"{self.llama} {self.rope} compiled / not, training (SDPA)", rope_compiled,
                     self.train(self.ours(self.rope)))
        self.compare(f"{self.llama} {self.rope} compiled / Llama compiled, training (SDPA)", rope_compiled,
                     hf_compiled)
        for encoding in self.biases[1:]:
            self.compare(f"{encoding} compiled / {self.rope} compiled, training (SDPA)",
                         self.train(self.ours(encoding, compiled=True)), rope_compiled)

    def kernel_rows(self) -> None:
        """The attention kernels alone, forward + backward."""
        decoder, train = self.sizes.decoder, self.sizes.train_length
        flash = self.kernel(KernelCase("sdpa"), decoder, train)
        rows = [("SDPA, a bias needing a gradient", KernelCase("sdpa", "learned_mask")),
                ("flex, no score function", KernelCase("flex_attention")),
                ("flex, ALiBi", KernelCase("flex_attention", "alibi")),
                ("flex, T5 per-distance table", KernelCase("flex_attention", "t5_distances",
                                                            kernel_options=SMALL_FLEX_BLOCKS)),
                ("flex, T5 bucket table", KernelCase("flex_attention", "t5_buckets", kernel_options=SMALL_FLEX_BLOCKS))]
        for name, case in rows:
            self.compare(f"kernel: {name} / SDPA flash", self.kernel(case, decoder, train), flash)
        encoder, length = self.sizes.encoder, self.sizes.encoder_length
        plain = self.kernel(KernelCase("sdpa"), encoder, length)
        for name, case in (("gathered + SDPA", KernelCase("sdpa", "c2p_p2c")),
                           ("in a flex score function",
                            KernelCase("flex_attention", "c2p_p2c", kernel_options=SMALL_FLEX_BLOCKS))):
            self.compare(f"kernel: DeBERTa terms {name} / SDPA without bias",
                         self.kernel(case, encoder, length), plain)


# The suite's groups of rows, in the order of the table (the points are measured with the groups taking turns).
ROW_GROUPS = ("decoder", "differential", "deberta", "long_forward", "generate", "flex_training", "compiled", "kernel")


def gpu_suite(sizes: SuiteSizes = GPU_SIZES, groups: tuple[str, ...] = ROW_GROUPS
              ) -> tuple[list[Point], list[PointRatio]]:
    """The points of the chosen row groups, the groups taking turns (`_Suite.points`), and their ratios in
    `ROW_GROUPS` order (a ratio's denominator is measured in the same run even when it belongs to another group).
    The encodings named are the baseline's rows."""
    unknown = sorted(set(groups) - set(ROW_GROUPS))
    if unknown:
        raise ValueError(f"row groups {unknown} do not exist; allowed values are {list(ROW_GROUPS)}.")
    suite = _Suite(sizes)
    for group in ROW_GROUPS:
        if group in groups:
            suite.group = group
            getattr(suite, f"{group}_rows")()
    return suite.points(), [ratio for ratios in suite.ratios.values() for ratio in ratios]


def suite_ratios(ratios: list[PointRatio], timings: list[PointTiming], peak_tflops: float | None) -> list[dict]:
    """Time and memory of each ratio's two points as measured, the MFU of each side, or the error that left a
    side without a figure."""
    by_point = {timing.point: timing for timing in timings}

    def quotient(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    rows = []
    for ratio in ratios:
        top, bottom = by_point[ratio.numerator], by_point[ratio.denominator]
        rows.append({
            "name": ratio.name, "numerator": ratio.numerator.label, "denominator": ratio.denominator.label,
            "time": quotient(top.median_ms, bottom.median_ms),
            "memory": quotient(top.peak_memory_mib, bottom.peak_memory_mib),
            "numerator_mfu": top.mfu(peak_tflops),
            "denominator_mfu": bottom.mfu(peak_tflops),
            "numerator_error": top.error, "denominator_error": bottom.error,
        })
    return rows


DEFAULT_BUDGET_S = 450.0  # the 8 minutes, less the start of the processes and the report


def run_gpu_suite(device: str = "cuda", sizes: SuiteSizes = GPU_SIZES, amp: bool = True, warmup: int = 2,
                  rounds: int = 5, compile: bool = True, jobs: int = 1, budget_s: float | None = DEFAULT_BUDGET_S,
                  peak_tflops: float | None = None, start_method: str = "forkserver", log=print,
                  groups: tuple[str, ...] = ROW_GROUPS, compile_cache: Path | None = None,
                  precompile_jobs: int = 1) -> dict:
    """Every point of `gpu_suite(sizes, groups)` in its own process within `budget_s`, compiles done ahead into
    `compile_cache`, and the ratios (see `points.run_points`)."""
    points, ratios = gpu_suite(sizes, groups)
    timings, spent = run_points(points, device, amp, warmup, rounds, compile, jobs, budget_s, start_method, log,
                                compile_cache, precompile_jobs)
    peak = device_peak_tflops(device, amp, peak_tflops)
    return {
        "case_set": "gpu", "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "precision": "bf16 autocast" if amp else "fp32", "compile": compile, "warmup": warmup, "rounds": rounds,
        "sizes": asdict(sizes), "row_groups": list(groups), "peak_tflops": peak, "seconds": spent["seconds"],
        "budget_s": budget_s, "jobs": jobs, "precompile_jobs": precompile_jobs,
        "compile_cache": str(compile_cache) if compile_cache else None, "time_spent": spent,
        "memory_method": "cuda.max_memory_allocated minus the built model" if device.startswith("cuda")
        else "VmHWM minus the resident set with the model built",
        "timings": [timing.as_dict(peak) for timing in timings],
        "ratios": suite_ratios(ratios, timings, peak),
    }
