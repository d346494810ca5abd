#!/usr/bin/env python
"""Extend the context of a pretrained Llama-style decoder: convert to posvar_llama, rescale RoPE, fine-tune at
factor × the trained length from a recipe, and score perplexity before and after.

    PYTHONPATH=$PWD python scripts/extend_context.py CHECKPOINT configs/extend/tiny_llama.yaml \
        --rope-scaling yarn --factor 4 --out-dir runs/extend [--max_steps 300 ...]

`--encoding NAME` switches the position encoding (e.g. alibi, xpos, fire) instead of rescaling RoPE.
CHECKPOINT is a LlamaForCausalLM or posvar_llama folder with its tokenizer (or pass --tokenizer). Arguments after
the recipe that the command does not know go to the training pipeline (`--key value`, `--model.field value`).
Writes OUT_DIR/extension.json and extension.md (perplexity and position-probe accuracy at the trained and the
extended length for the converted model, the rescaled one before fine-tuning, and the fine-tuned one) and the
fine-tuned model in OUT_DIR/extended. An OUT_DIR holding an earlier run's converted models is refused unless
`--overwrite` (the fine-tune in OUT_DIR/extended follows the training pipeline's own rules: the same command resumes).
"""

import argparse
import sys
from pathlib import Path

from hf_posvariants.evaluation.extension import extend
from hf_posvariants.evaluation.length import ROPE_SCALINGS


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("recipe", help="fine-tuning recipe, e.g. configs/extend/tiny_llama.yaml")
    change = parser.add_mutually_exclusive_group()
    change.add_argument("--rope-scaling", choices=ROPE_SCALINGS, help="RoPE rescaling (default: yarn)")
    change.add_argument("--encoding", help="switch to this position encoding instead (e.g. alibi, xpos, fire)")
    parser.add_argument("--factor", type=float, default=4.0, help="extended length / trained length")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/extend"))
    parser.add_argument("--overwrite", action="store_true", help="replace the converted models of an earlier run in "
                                                                 "OUT_DIR (converted/, changed/)")
    parser.add_argument("--tokenizer", help="tokenizer folder when the checkpoint has none")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored at every length")
    parser.add_argument("--probe-examples", type=int, default=8, help="position-probe examples per task and length "
                                                                      "(0: no probes)")
    args, overrides = parser.parse_known_args(argv)
    rope_scaling = args.rope_scaling or (None if args.encoding else "yarn")
    report = extend(args.checkpoint, args.recipe, args.factor, args.out_dir, rope_scaling, args.encoding, overrides,
                    args.tokenizer, args.eval_tokens, args.probe_examples, args.overwrite)
    print((args.out_dir / "extension.md").read_text())
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
