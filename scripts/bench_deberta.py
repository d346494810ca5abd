"""Training-step time and peak memory of posvar_deberta (SDPA) against transformers' DebertaV2ForMaskedLM
(eager-only) and BertForMaskedLM (SDPA), at one shared config, in one run.

Each model runs in its own subprocess so peak memory is its own: on CUDA `torch.cuda.max_memory_allocated`,
on CPU the growth of the process's peak resident set (`ru_maxrss`) from after the model is built to
after the timed steps (activations, gradients, AdamW state).

    python scripts/bench_deberta.py                     # CPU default: hidden 256, 4 layers, batch 4, seq 512
    python scripts/bench_deberta.py --device cuda --hidden 768 --layers 12 --batch 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = ("posvar_deberta", "posvar_deberta_emd", "transformers_debertav2", "transformers_bert")
# Targets of issue 3, as ratios of posvar_deberta (no EMD, same computation as DebertaV2) to the others.
TARGETS = {"time vs DebertaV2": 0.55, "time vs BERT": 1.3, "memory vs DebertaV2": 0.7}


def build(name: str, args: argparse.Namespace) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM, DebertaV2Config, DebertaV2ForMaskedLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_posvariants import PosVarDebertaConfig, PosVarDebertaForMaskedLM

    shared = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, max_position_embeddings=args.seq,
    )
    # DeBERTa-v3's relative attention: c2p + p2c, 256 log buckets over 512 positions, shared keys.
    relative = dict(pos_att_type=["c2p", "p2c"], position_buckets=args.buckets, max_relative_positions=args.seq,
                    share_att_key=True, norm_rel_ebd="layer_norm")
    if name.startswith("posvar_deberta"):
        # transformers' DeBERTa and BERT default to dropout 0.1 everywhere; ours must pay for it too.
        dropout = dict(hidden_dropout=0.1, attention_dropout=0.1)
        config = PosVarDebertaConfig(**shared, **relative, **dropout, emd_layers=2 if name.endswith("emd") else 0)
        return PosVarDebertaForMaskedLM._from_config(config, attn_implementation="sdpa")
    if name == "transformers_debertav2":
        config = DebertaV2Config(**shared, **relative, relative_attention=True, position_biased_input=False)
        return DebertaV2ForMaskedLM._from_config(config, attn_implementation="eager")
    return BertForMaskedLM._from_config(BertConfig(**shared), attn_implementation="sdpa")


def worker(name: str, args: argparse.Namespace) -> dict:
    """Time `args.steps` training steps after `args.warmup` untimed ones; report seconds/step and the peak
    memory above the built model (MiB)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(name, args).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(5, args.vocab, (args.batch, args.seq), device=device)
    labels = torch.where(torch.rand(input_ids.shape, device=device) < 0.15, input_ids, -100)
    attention_mask = torch.ones_like(input_ids)

    def step() -> None:
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Peak memory counts from here: gradients, AdamW state and activations of every step, warm-up included
    # (on CPU the peak resident set is a high-water mark, so it cannot be restarted after warm-up).
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(args.warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 2**10
    return {"model": name, "seconds_per_step": seconds, "peak_mib": peak_mib,
            "parameters": sum(p.numel() for p in model.parameters())}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--buckets", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    forwarded = sys.argv[1:]
    results = {}
    for name in MODELS:
        output = subprocess.run([sys.executable, __file__, *forwarded, "--worker", name], stdout=subprocess.PIPE, text=True,
                                check=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    print(f"device={args.device} hidden={args.hidden} layers={args.layers} heads={args.heads} batch={args.batch} "
          f"seq={args.seq} buckets={args.buckets} steps={args.steps}")
    print(f"{'model':26s} {'s/step':>8s} {'peak MiB':>9s} {'params':>10s}")
    for name, result in results.items():
        print(f"{name:26s} {result['seconds_per_step']:8.3f} {result['peak_mib']:9.1f} {result['parameters']:10d}")
    ours, deberta, bert = (results[n] for n in ("posvar_deberta", "transformers_debertav2", "transformers_bert"))
    ratios = {
        "time vs DebertaV2": ours["seconds_per_step"] / deberta["seconds_per_step"],
        "time vs BERT": ours["seconds_per_step"] / bert["seconds_per_step"],
        "memory vs DebertaV2": ours["peak_mib"] / deberta["peak_mib"],
    }
    for label, ratio in ratios.items():
        verdict = "meets" if ratio <= TARGETS[label] else "misses"
        print(f"posvar_deberta {label}: {ratio:.2f}x (target <= {TARGETS[label]}x: {verdict})")


if __name__ == "__main__":
    main()
