"""Differential attention's kernel paths, timed against transformers' DiffLlama in one run.

    PYTHONPATH=$PWD python scripts/bench_diff_paths.py --seq 256 --batch 4 --hidden 256 --threads 1 [--backend eager]

`scripts/bench_diff.py`'s models and training step (its `build_models` and arguments), with our
differential model once per path of `KERNEL_CALLS` (forced), steps interleaved, timed in process CPU time
so that waiting on a shared, overloaded CPU does not count. `KERNEL_CALL_CHOICES` should name the fastest
path for each backend and device; this script is how to check it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_diff  # noqa: E402  (a sibling script)

from hf_posvariants.differential_attention import KERNEL_CALLS, DifferentialAttention  # noqa: E402

REFERENCE, STANDARD, OURS = "transformers DiffLlama", "ours standard", "ours differential"


def build(args: argparse.Namespace, backend: str) -> dict[str, torch.nn.Module]:
    models = bench_diff.build_models(args)
    ours = models.pop(OURS)
    for path in KERNEL_CALLS:
        forced = copy.deepcopy(ours)
        for module in forced.modules():
            if isinstance(module, DifferentialAttention):
                module.kernel_calls = path
        models[f"{OURS} {path}"] = forced
    for model in models.values():
        model.set_attn_implementation(backend)
    return models


def main() -> None:
    backend = "sdpa"
    if "--backend" in sys.argv:
        at = sys.argv.index("--backend")
        backend = sys.argv[at + 1]
        del sys.argv[at : at + 2]
    args = bench_diff.parse_args()
    torch.set_num_threads(args.threads or 1)
    models = build(args, backend)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.warmup + args.steps):
        names = list(models)
        for name in names[step % len(names) :] + names[: step % len(names)]:  # rotated, interleaved
            model = models[name].train()
            start = time.process_time()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(time.process_time() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{backend}, hidden {args.hidden}, layers {args.layers}, {args.heads} heads / {args.kv_heads} KV heads, "
          f"seq {args.seq}, batch {args.batch}; CPU ms per training step, median of {args.steps}")
    for name in models:
        print(f"  {name:32s} {1e3 * median[name]:8.1f}")
    for path in KERNEL_CALLS:
        ours = median[f"{OURS} {path}"]
        print(f"  {path:12s} / DiffLlama {ours / median[REFERENCE]:.3f}   / standard {ours / median[STANDARD]:.3f}")


if __name__ == "__main__":
    main()
