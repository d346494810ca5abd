"""Training-step speed of differential attention, against transformers' DiffLlama and our standard attention.

    python scripts/bench_diff.py [--hidden 256 --layers 4 --seq 512 --batch 4 --steps 7]

Three models at one shared config, timed in one run with the steps interleaved (so that load from other
processes hits all three alike), each step being forward + backward + AdamW on random tokens:
  - transformers' DiffLlamaForCausalLM (sdpa);
  - ours, converted from it (posvar_diff, sdpa): the same function and parameters;
  - ours with standard attention at the same heads and widths, hence the same parameter count bar the λ
    vectors (the paper's matching: half as many differential heads, each twice as wide).
Prints median milliseconds per step and the two ratios the project tracks (targets: ≤ 1.00 and ≤ 1.15).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DiffLlamaConfig, DiffLlamaForCausalLM

from hf_posvariants import PosVarLlamaConfig, PosVarLlamaForCausalLM
from hf_posvariants.diffllama_conversion import from_diffllama


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8, help="softmax maps; differential heads are half")
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, default: torch's")
    return parser.parse_args()


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    reference_config = DiffLlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    reference = DiffLlamaForCausalLM._from_config(reference_config, attn_implementation="sdpa")
    ours = from_diffllama(reference)
    standard_fields = {
        key: value
        for key, value in ours.config.to_dict().items()
        if key in PosVarLlamaConfig.__dataclass_fields__ and key not in ("transformers_version", "architectures")
    }
    standard_config = PosVarLlamaConfig(**{**standard_fields, "attention_variant": "standard"})
    standard = PosVarLlamaForCausalLM._from_config(standard_config, attn_implementation="sdpa")
    return {"transformers DiffLlama": reference, "ours differential": ours, "ours standard": standard}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models(args)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.warmup + args.steps):
        names = list(models)
        order = names[step % len(names) :] + names[: step % len(names)]  # rotated, so no model always goes first
        for name in order:  # interleaved, so background load hits every model alike
            model = models[name]
            model.train()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    print(
        f"config: hidden {args.hidden}, layers {args.layers}, {args.heads} heads / {args.kv_heads} KV heads, "
        f"seq {args.seq}, batch {args.batch}, vocab {args.vocab}; {args.steps} timed steps after {args.warmup} "
        f"warm-up; torch threads {torch.get_num_threads()}"
    )
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, model in models.items():
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{name:24s} {1e3 * median[name]:9.1f} ms/step (median)   {parameters:,} parameters")
    print(f"ours / transformers DiffLlama (target <= 1.00): {median['ours differential'] / median['transformers DiffLlama']:.3f}")
    print(f"differential / standard attention (target <= 1.15): {median['ours differential'] / median['ours standard']:.3f}")


if __name__ == "__main__":
    main()
