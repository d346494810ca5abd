"""Position probes (passkey at several depths, copy, associative recall): accuracy against length.

    PYTHONPATH=$PWD python scripts/probes.py CHECKPOINT --lengths 64 128 256 512 --out-dir outputs/probes

Writes probes.json, probes.md and probes.png (accuracy vs length, one line per task and depth).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from hf_posvariants.evaluation.data import load_tokenizer
from hf_posvariants.evaluation.probes import PROBES, probe_sweep, write_probe_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--tokenizer", help='"bytes", or a tokenizer folder (default: the checkpoint)')
    parser.add_argument("--tasks", nargs="+", default=sorted(PROBES), choices=sorted(PROBES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="passkey depths")
    parser.add_argument("--examples", type=int, default=32, help="examples per task, length and depth")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/probes"))
    args = parser.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    rows = probe_sweep(model, tokenizer, args.tasks, args.lengths, args.depths, args.examples, args.batch_size)
    runs = {Path(args.checkpoint).name: rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "probes.json").write_text(json.dumps({"checkpoint": args.checkpoint, "runs": runs}, indent=2))
    write_probe_report(runs, args.out_dir)
    print((args.out_dir / "probes.md").read_text())
    return runs


if __name__ == "__main__":
    main()
