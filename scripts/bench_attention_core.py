"""Time the attention kernel alone (forward + backward), without the rest of a training step.

    PYTHONPATH=$PWD python scripts/bench_attention_core.py --length 512 --threads 1

Shows what a backend can gain at most: our eager kernel vs PyTorch SDPA on one causal head set, and
the two ways to run differential attention on SDPA (two calls on equal-width value halves, as we do,
vs one call with double-width values, as transformers' DiffLlama does).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn.functional import scaled_dot_product_attention

from hf_posvariants.attention import eager_attention_forward


class _Heads(nn.Module):
    num_key_value_groups = 1  # what eager_attention_forward reads from its module


def timed(step, rounds: int) -> float:
    """Median CPU milliseconds (process time: waiting on a shared machine does not count)."""
    step()
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        step()
        samples.append((time.process_time() - start) * 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (args.batch, args.heads, args.length, args.head_dim)
    query, key, value = (torch.randn(shape, requires_grad=True) for _ in range(3))
    wide_value = torch.randn(*shape[:-1], 2 * args.head_dim, requires_grad=True)
    scale = args.head_dim**-0.5
    causal = torch.full((args.length, args.length), torch.finfo(torch.float32).min).triu(1)[None, None]
    module = _Heads().train()

    def eager():
        eager_attention_forward(module, query, key, value, causal, scaling=scale)[0].sum().backward()

    def sdpa():
        scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale).sum().backward()

    def differential_two_calls():
        first = scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
        second = scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
        (first.sum() + second.sum()).backward()

    def differential_one_wide_call():
        scaled_dot_product_attention(query, key, wide_value, is_causal=True, scale=scale).sum().backward()

    print(f"attention core, forward + backward, {args.batch}×{args.heads} heads × {args.length} × {args.head_dim}, "
          f"{args.threads} thread(s), median of {args.rounds}")
    results = {step.__name__: timed(step, args.rounds) for step in
               (eager, sdpa, differential_two_calls, differential_one_wide_call)}
    for name, ms in results.items():
        print(f"  {name:28s} {ms:8.1f} ms")
    print(f"  SDPA speed-up over eager: {results['eager'] / results['sdpa']:.2f}×")
    print(f"  differential, two calls / one wide call: "
          f"{results['differential_two_calls'] / results['differential_one_wide_call']:.2f}×")
    return results


if __name__ == "__main__":
    main()
