"""Every family × position encoding checked on one device (eager ≡ SDPA, ≡ flex where asked, cached generation
≡ recomputing, a finite bf16 training step): the CPU suite's numerical contract where the kernels differ.

    PYTHONPATH=$PWD python scripts/device_check.py --device cuda --flex rope alibi t5_bias --out device_check.json
    PYTHONPATH=$PWD python scripts/device_check.py --device cpu --encodings rope alibi     # seconds

Exits 1 when any case fails, naming it and the check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hf_posvariants.evaluation.device_check import run_device_checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--encodings", nargs="*", help="default: every selectable encoding")
    parser.add_argument("--flex", nargs="*", default=[], help="encodings also compared on flex_attention")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    results = run_device_checks(args.device, args.encodings, tuple(args.flex))
    failed = [result for result in results if result.failures]
    print(f"{len(results) - len(failed)}/{len(results)} cases passed on {args.device}"
          f" ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([result.as_dict() for result in results], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
