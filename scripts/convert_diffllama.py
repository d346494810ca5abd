"""Convert a transformers DiffLlamaForCausalLM checkpoint into a posvar_diff one.

    python scripts/convert_diffllama.py path/to/diffllama path/to/output [--overwrite]

The output loads with `AutoModelForCausalLM.from_pretrained(output)` once hf_posvariants is imported and
computes the same logits (the head layout is "halves" and the per-head norm has no weight, as in diffllama).
OUTPUT must be new or empty (`--overwrite` replaces an earlier conversion; a folder holding anything but model
files, the source or the current directory is never replaced); the conversion is written beside it and renamed
into place, so a killed conversion leaves no half-written OUTPUT.
"""

from __future__ import annotations

import argparse
import sys

from transformers import AutoTokenizer, DiffLlamaForCausalLM

from hf_posvariants.conversion import convert_diffllama
from hf_posvariants.conversion.output import model_folder_written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="directory (or Hub id) of a DiffLlamaForCausalLM checkpoint")
    parser.add_argument("output", help="directory to write the posvar_diff checkpoint to (new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT when it holds an earlier conversion (model files only)")
    args = parser.parse_args(argv)
    try:
        with model_folder_written(args.source, args.output, args.overwrite) as partial:
            model = convert_diffllama(DiffLlamaForCausalLM.from_pretrained(args.source))
            model.save_pretrained(partial)
            try:
                AutoTokenizer.from_pretrained(args.source).save_pretrained(partial)
            except (OSError, ValueError):
                print("no tokenizer found next to the checkpoint; only the model was written")
    except ValueError as error:
        print(f"convert_diffllama: {error}", file=sys.stderr)
        return 2
    print(f"wrote {type(model).__name__} ({model.num_parameters():,} parameters) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
