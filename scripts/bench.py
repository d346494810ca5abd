"""Time, count and measure our variants against transformers' own models: the one benchmark entry point.

    PYTHONPATH=$PWD python scripts/bench.py --lengths 128 512 --out-dir bench_results       # every variant
    PYTHONPATH=$PWD python scripts/bench.py --case-set deberta --lengths 512 --vocab-size 8000 --dropout 0.1
    PYTHONPATH=$PWD python scripts/bench.py --case-set differential --lengths 512 --heads 8 --kv-heads 4 \
        --intermediate-size 680 --vocab-size 1024
    PYTHONPATH=$PWD python scripts/bench.py --case-set kernels --lengths 512 --heads 4 --head-dim 64
    PYTHONPATH=$PWD python scripts/bench.py --device cuda --amp --lengths 1024 2048   # GPU: CUDA events, bf16, MFU
    PYTHONPATH=$PWD python scripts/bench.py --quick            # seconds; what the tests run
    PYTHONPATH=$PWD python scripts/bench.py --case-set training_targets --threads 1 --clock cpu
    PYTHONPATH=$PWD python scripts/bench.py --case-set gpu     # one CUDA GPU, in 450 s (--budget-s): every GPU row
    PYTHONPATH=$PWD python scripts/bench.py --case-set gpu --dry-run   # the same suite on the CPU, tiny sizes

Case sets: `variants` (every family × encoding × backend, and each transformers reference against the case of
ours built to match it), `deberta` (DebertaV2 and BERT), `differential` (DiffLlama and standard attention),
`long_context` and `bias_training` (score biases against RoPE), `training_targets` (the training-step targets of
bias encodings, DeBERTa and differential attention, each at its own length), `kernels` (the attention kernel
alone, forward + backward, by torch.utils.benchmark), `gpu` (the GPU baseline's rows, each case in a process of
its own, bf16, precompile processes compiling ahead into one shared cache, within a time budget; --dry-run runs
them tiny on the CPU, uncompiled). Prints the ratios measured in this run (for `gpu` also where the time went)
and writes bench.json and bench.md. See hf_posvariants/evaluation/bench/ for the method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_posvariants.evaluation.bench import (
    CASE_SETS,
    BenchShape,
    kernel_markdown_report,
    markdown_report,
    run_benchmark,
    run_kernel_benchmark,
    suite_markdown_report,
)
from hf_posvariants.evaluation.bench.gpu import DEFAULT_BUDGET_S, GPU_SIZES, ROW_GROUPS, TINY_SIZES, run_gpu_suite
from hf_posvariants.evaluation.bench.measurement import DEFAULT_LENGTHS
from hf_posvariants.evaluation.bench.points import START_METHODS
from hf_posvariants.evaluation.bench.report import suite_ratio_table, suite_time_summary

KERNELS = "kernels"
GPU = "gpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case-set", choices=[*CASE_SETS, KERNELS, GPU], default="variants", help="what to measure")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="sequence lengths (default: the case set's own, else 128 and 512)")
    parser.add_argument("--backends", nargs="+", default=["eager", "sdpa"],
                        help="attention backends; add flex_attention to try it (it compiles, and is skipped with "
                             "its error where it cannot run)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: as many as --heads)")
    parser.add_argument("--intermediate-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout of every model")
    parser.add_argument("--head-dim", type=int, default=64, help="kernels: width of one head")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="kernels: seconds of calls per case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--families", nargs="*", help="variants: model types to include (default: every family)")
    parser.add_argument("--encodings", nargs="*", help="variants: position encodings to include (default: all)")
    parser.add_argument("--tasks", nargs="+", choices=["train", "forward"],
                        help="default: the case set's own, else train and forward")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case peak-memory measurement")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: CPU time of this process per step, robust on a shared CPU (use --threads 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (bf16 inputs for the kernel cases)")
    parser.add_argument("--peak-tflops", type=float,
                        help="device peak for MFU (default: known GPUs' bf16 peak with --amp; none on CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny models, one short length, two rounds, no memory")
    parser.add_argument("--dry-run", action="store_true",
                        help="gpu: the same suite tiny on the CPU, one round, nothing compiled (checks that it runs)")
    parser.add_argument("--jobs", type=int, help="gpu: cases run at a time (default 1; 2 with --dry-run)")
    parser.add_argument("--budget-s", "--time-budget", dest="budget_s", type=float, default=DEFAULT_BUDGET_S,
                        help="gpu: seconds for the whole suite; a case still running then is stopped and, like every "
                             "case not started, reported as 'not measured: budget'")
    parser.add_argument("--compile-cache", type=Path,
                        help="gpu: the folder every case's process compiles into and loads from (default: "
                             "OUT_DIR/compile_cache; kept, so a second run on the machine compiles nothing anew)")
    parser.add_argument("--precompile-jobs", type=int,
                        help="gpu: processes compiling ahead at a time, beside the cases (default 2; 1 with "
                             "--dry-run; 0: each case that compiles does it in its own process)")
    parser.add_argument("--rows", nargs="+", choices=ROW_GROUPS, default=list(ROW_GROUPS),
                        help="gpu: the groups of rows to measure (default: all, in this order)")
    parser.add_argument("--start-method", choices=START_METHODS, default="forkserver",
                        help="gpu: how each case's process starts (spawn: from scratch, seconds of imports each)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench_results"))
    return parser.parse_args(argv)


def gpu_run(args: argparse.Namespace) -> dict:
    """The GPU rows on `--device` (bf16), or with --dry-run tiny on the CPU: fp32, one round, nothing compiled."""
    common = dict(budget_s=args.budget_s, peak_tflops=args.peak_tflops, start_method=args.start_method,
                  groups=tuple(args.rows), compile_cache=args.compile_cache or args.out_dir / "compile_cache")
    if args.dry_run:
        return run_gpu_suite("cpu", TINY_SIZES, amp=False, warmup=0, rounds=1, compile=False, jobs=args.jobs or 2,
                             precompile_jobs=1 if args.precompile_jobs is None else args.precompile_jobs, **common)
    if not args.device.startswith("cuda"):
        raise SystemExit(f"--case-set gpu needs --device cuda (got {args.device!r}); --dry-run runs it on the CPU.")
    precompile_jobs = 2 if args.precompile_jobs is None else args.precompile_jobs
    return run_gpu_suite(args.device, GPU_SIZES, amp=True, warmup=args.warmup, rounds=args.rounds,
                         jobs=args.jobs or 1, precompile_jobs=precompile_jobs, **common)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case_set == GPU:
        result = gpu_run(args)
        report = suite_markdown_report(result)
        summary = suite_ratio_table(result) + "\n" + suite_time_summary(result)
    elif args.case_set == KERNELS:
        lengths, min_run_time = ([32], 0.05) if args.quick else (args.lengths or DEFAULT_LENGTHS, args.min_run_time)
        result = run_kernel_benchmark(args.backends, args.batch_size, args.heads, lengths,
                                      8 if args.quick else args.head_dim, args.device, args.clock, args.amp,
                                      min_run_time)
        report = kernel_markdown_report(result)
    else:
        shape = BenchShape(args.hidden_size, args.layers, args.heads, args.intermediate_size, args.vocab_size,
                           args.batch_size, args.kv_heads, args.dropout)
        lengths, warmup, rounds, memory = args.lengths, args.warmup, args.rounds, not args.no_memory
        if args.quick:
            # a case set pinning its ratios to lengths keeps them: they are its targets' lengths
            pinned = CASE_SETS[args.case_set](args.backends, args.families, args.encodings).pinned_lengths()
            shape, warmup, rounds, memory = BenchShape(32, 2, 4, 64, 97, 2), 1, 2, False
            lengths = None if pinned else [32]
        result = run_benchmark(shape, lengths, args.backends, warmup, rounds, args.device,
                               tuple(args.tasks) if args.tasks else None, memory, args.families, args.encodings,
                               args.clock, args.case_set, args.amp, args.peak_tflops)
        report = markdown_report(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    (args.out_dir / "bench.md").write_text(report)
    print(summary if args.case_set == GPU else report.split("## Every case")[0])
    print(f"wrote {args.out_dir / 'bench.json'} and {args.out_dir / 'bench.md'}")
    return result


if __name__ == "__main__":
    main()
