"""Speed, memory and FLOP rate of our variants against transformers' own models: the one benchmark.

`cases` says what to measure (cases, case sets and their targets), `measurement` runs them (interleaved in
one process), `points` runs each point in a process of its own within a time budget, its compiles done ahead,
`report` writes the Markdown, `gpu` holds the GPU rows.
`scripts/bench.py` is the command line.
"""

from hf_posvariants.evaluation.bench.cases import (
    CASE_SETS,
    REFERENCE_BUILDERS,
    BenchShape,
    Case,
    CaseSet,
    KernelCase,
    Point,
    Ratio,
    RatioSpec,
    deberta_case_set,
    differential_case_set,
    families_declaring,
    reference_case,
    score_bias_encodings,
)
from hf_posvariants.evaluation.bench.measurement import (
    Runner,
    Timing,
    count_flops,
    memory_child,
    model_flops,
    peak_memory_mib,
    run_benchmark,
    run_kernel_benchmark,
)
from hf_posvariants.evaluation.bench.points import run_points
from hf_posvariants.evaluation.bench.report import kernel_markdown_report, markdown_report, suite_markdown_report

__all__ = [
    "CASE_SETS", "REFERENCE_BUILDERS", "BenchShape", "Case", "CaseSet", "KernelCase", "Point", "Ratio", "RatioSpec",
    "deberta_case_set", "differential_case_set", "families_declaring", "reference_case", "score_bias_encodings",
    "Runner", "Timing", "count_flops", "memory_child", "model_flops", "peak_memory_mib", "run_benchmark",
    "run_kernel_benchmark", "run_points", "kernel_markdown_report", "markdown_report", "suite_markdown_report",
]
