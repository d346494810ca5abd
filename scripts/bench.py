"""Time a training step and an inference forward of every variant against transformers' own models.

    PYTHONPATH=$PWD python scripts/bench.py --lengths 128 512 --out-dir bench_results
    PYTHONPATH=$PWD python scripts/bench.py --quick            # seconds; what the tests run

Prints the ratios of issue 2 (ours vs LlamaForCausalLM, SDPA vs eager, ALiBi/T5 vs RoPE) measured in
this run, and writes bench.json and bench.md. See hf_posvariants/evaluation/bench.py for the method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_posvariants.evaluation.bench import BenchShape, markdown_report, run_benchmark


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--backends", nargs="+", default=["eager", "sdpa"],
                        help="attention backends; add flex_attention to try it (it compiles, and is skipped with "
                             "its error where it cannot run)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--families", nargs="*", help="model types to include (default: every registered family)")
    parser.add_argument("--encodings", nargs="*", help="position encodings to include (default: all registered)")
    parser.add_argument("--tasks", nargs="+", default=["train", "forward"], choices=["train", "forward"])
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case peak-memory measurement")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: CPU time of this process per step, robust on a shared CPU (use --threads 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models, one short length, two rounds, no memory")
    parser.add_argument("--out-dir", type=Path, default=Path("bench_results"))
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = BenchShape(args.hidden_size, args.layers, args.heads, args.intermediate_size, args.vocab_size,
                       args.batch_size)
    lengths, warmup, rounds, memory = args.lengths, args.warmup, args.rounds, not args.no_memory
    if args.quick:
        shape, lengths, warmup, rounds, memory = BenchShape(32, 2, 4, 64, 97, 2), [32], 1, 2, False
    result = run_benchmark(shape, lengths, args.backends, warmup, rounds, args.device, tuple(args.tasks), memory,
                           args.families, args.encodings, args.clock)
    report = markdown_report(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    (args.out_dir / "bench.md").write_text(report)
    print(report.split("## Every case")[0])
    print(f"wrote {args.out_dir / 'bench.json'} and {args.out_dir / 'bench.md'}")
    return result


if __name__ == "__main__":
    main()
