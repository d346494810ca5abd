"""Training-step time and peak memory of posvar_deberta (SDPA) against transformers' DebertaV2ForMaskedLM
(eager-only) and BertForMaskedLM (SDPA), at one shared config, in one run.

Step time (fwd + bwd + AdamW) is the median over interleaved steps in one process. Peak memory is measured
per model in its own subprocess: on CUDA `torch.cuda.max_memory_allocated`, on CPU the growth of the
process's peak resident set (`ru_maxrss`) from after the model is built over two training steps.

    python scripts/bench_deberta.py                     # CPU default: hidden 256, 4 layers, batch 4, seq 512
    python scripts/bench_deberta.py --device cuda --hidden 768 --layers 12 --batch 8
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
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


class Trainee:
    """One model with its AdamW optimizer and a fixed masked-LM batch; `step()` is fwd + bwd + update."""

    def __init__(self, name: str, args: argparse.Namespace):
        torch.manual_seed(0)
        self.device = torch.device(args.device)
        self.model = build(name, args).to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.input_ids = torch.randint(5, args.vocab, (args.batch, args.seq), device=self.device)
        self.labels = torch.where(torch.rand(self.input_ids.shape, device=self.device) < 0.15, self.input_ids, -100)
        self.attention_mask = torch.ones_like(self.input_ids)

    def step(self) -> float:
        """Seconds for one training step."""
        start = time.perf_counter()
        self.model(input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.labels).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def peak_memory(name: str, args: argparse.Namespace) -> float:
    """MiB of peak memory above the built model over two training steps (gradients, AdamW state, activations).

    On CPU the peak resident set is a high-water mark that cannot be reset, hence one process per model.
    """
    trainee = Trainee(name, args)
    if trainee.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(2):
        trainee.step()
    if trainee.device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 2**10


def step_times(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step, the models' steps interleaved round by round so that a shared machine's
    changing load falls on all of them alike."""
    trainees = {name: Trainee(name, args) for name in MODELS}
    for trainee in trainees.values():
        for _ in range(args.warmup):
            trainee.step()
    times = {name: [] for name in MODELS}
    for _ in range(args.steps):
        for name, trainee in trainees.items():
            times[name].append(trainee.step())
    return {name: statistics.median(values) for name, values in times.items()}


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
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(peak_memory(args.worker, args)))
        return
    memory = {}
    for name in MODELS:
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", name]
        memory[name] = json.loads(subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout.split()[-1])
    seconds = step_times(args)
    print(f"device={args.device} hidden={args.hidden} layers={args.layers} heads={args.heads} batch={args.batch} "
          f"seq={args.seq} buckets={args.buckets} timed steps={args.steps} (median, interleaved)")
    print(f"{'model':24s} {'s/step':>8s} {'peak MiB':>9s}")
    for name in MODELS:
        print(f"{name:24s} {seconds[name]:8.3f} {memory[name]:9.1f}")
    ratios = {
        "time vs DebertaV2": seconds["posvar_deberta"] / seconds["transformers_debertav2"],
        "time vs BERT": seconds["posvar_deberta"] / seconds["transformers_bert"],
        "memory vs DebertaV2": memory["posvar_deberta"] / memory["transformers_debertav2"],
    }
    for label, ratio in ratios.items():
        verdict = "meets" if ratio <= TARGETS[label] else "misses"
        print(f"posvar_deberta {label}: {ratio:.2f}x (target <= {TARGETS[label]}x: {verdict})")


if __name__ == "__main__":
    main()
