"""Convert a transformers DiffLlamaForCausalLM checkpoint into a posvar_diff one.

    python scripts/convert_diffllama.py path/to/diffllama path/to/output

The output loads with `AutoModelForCausalLM.from_pretrained(output)` once hf_posvariants is imported and
computes the same logits (the head layout is "halves" and the per-head norm has no weight, as in diffllama).
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer, DiffLlamaForCausalLM

from hf_posvariants.conversion import convert_diffllama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="directory (or Hub id) of a DiffLlamaForCausalLM checkpoint")
    parser.add_argument("output", help="directory to write the posvar_diff checkpoint to")
    args = parser.parse_args()
    model = convert_diffllama(DiffLlamaForCausalLM.from_pretrained(args.source))
    model.save_pretrained(args.output)
    try:
        AutoTokenizer.from_pretrained(args.source).save_pretrained(args.output)
    except (OSError, ValueError):
        print("no tokenizer found next to the checkpoint; only the model was written")
    print(f"wrote {type(model).__name__} ({model.num_parameters():,} parameters) to {args.output}")


if __name__ == "__main__":
    main()
