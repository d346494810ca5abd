#!/usr/bin/env python
"""Extend one pretrained RoPE checkpoint with several rescalings after the same fine-tuning, and compare.

    PYTHONPATH=$PWD python scripts/train.py configs/extend/war_and_peace_pretrain.yaml
    PYTHONPATH=$PWD python scripts/extension_study.py runs/wp_rope_256 configs/extend/war_and_peace.yaml \
        --scalings linear yarn dynamic --factor 4 --out-dir docs/context_extension

Each rescaling runs `scripts/extend_context.py`'s pipeline (convert, rescale, fine-tune from the recipe, score) with
its models under --work-dir (an earlier study's converted models there are replaced only with --overwrite); the
study writes study.json, study.md and perplexity.png to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hf_posvariants.evaluation.extension import extend  # noqa: E402
from hf_posvariants.evaluation.length import ROPE_SCALINGS  # noqa: E402

SCALING_NAMES = {"linear": "PI (linear)", "yarn": "YaRN", "dynamic": "dynamic NTK", "llama3": "Llama 3"}


def study_table(reports: dict[str, dict]) -> str:
    """One row per rescaling: perplexity at both lengths before fine-tuning and after, and probe accuracy after."""
    first = next(iter(reports.values()))
    short, long = first["original_length"], first["extended_length"]
    as_trained = first["perplexity"]["as trained"]
    probes = list(next(iter(first["probes"].values())))
    header = ["rescaling", f"ppl@{short} before", f"ppl@{long} before", f"ppl@{short} after", f"ppl@{long} after",
              *(f"{probe} after" for probe in probes)]  # fmt: skip
    rows = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    rows.append(f"| as trained (no rescaling) | {as_trained[short]:.3f} | {as_trained[long]:.3f} | | |" + " |" * len(probes))
    for scaling, report in reports.items():
        stages = list(report["perplexity"].values())
        before, after = stages[1], stages[2]
        accuracy = list(report["probes"].values())[2].values()
        cells = [f"{before[short]:.3f}", f"{before[long]:.3f}", f"{after[short]:.3f}", f"{after[long]:.3f}"]
        cells += ["n/a" if value is None else f"{value:.2f}" for value in accuracy]
        rows.append(f"| {SCALING_NAMES[scaling]} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(reports: dict[str, dict], path: Path) -> None:
    first = next(iter(reports.values()))
    lengths = [first["original_length"], first["extended_length"]]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for axis, length in zip(axes, lengths):
        names = ["as trained"] + [SCALING_NAMES[s] for s in reports]
        before = [first["perplexity"]["as trained"][length]] + [list(r["perplexity"].values())[1][length] for r in reports.values()]
        after = [None] + [list(r["perplexity"].values())[2][length] for r in reports.values()]
        positions = range(len(names))
        axis.bar([p - 0.2 for p in positions], before, width=0.4, label="rescaled, before fine-tuning")
        axis.bar([p + 0.2 for p in positions[1:]], after[1:], width=0.4, label="after fine-tuning")
        axis.set_xticks(list(positions), names, rotation=20)
        axis.set_title(f"perplexity at {length} tokens")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("recipe")
    parser.add_argument("--scalings", nargs="+", choices=ROPE_SCALINGS, default=["linear", "yarn", "dynamic"])
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/extension_study"))
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/extension_study"))
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--probe-examples", type=int, default=8)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the converted models an earlier study left under --work-dir")
    args, overrides = parser.parse_known_args(argv)
    reports = {
        scaling: extend(args.checkpoint, args.recipe, args.factor, args.work_dir / scaling, rope_type=scaling,
                        overrides=overrides, eval_tokens=args.eval_tokens, probe_examples=args.probe_examples,
                        overwrite=args.overwrite)
        for scaling in args.scalings
    }  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "study.json").write_text(json.dumps(reports, indent=2))
    (args.out_dir / "study.md").write_text(study_table(reports))
    plot(reports, args.out_dir / "perplexity.png")
    print((args.out_dir / "study.md").read_text())
    return reports


if __name__ == "__main__":
    main(sys.argv[1:])
