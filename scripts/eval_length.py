"""Perplexity of a causal checkpoint at multiples of its training length, non-overlapping and sliding.

The training length is the block_size in the checkpoint's run record (run_args.json, written by
scripts/train.py), or --train-length.

    PYTHONPATH=$PWD python scripts/eval_length.py CHECKPOINT \
        --corpus ../shared/data/war_and_peace/war_and_peace.txt --rope-scaling yarn --out-dir outputs/length

Writes length.json, length.md, length.png (perplexity vs length) and per_position.png (loss by
position at one length). `--rope-scaling` adds a second run with the RoPE rescaled at evaluation
time only (transformers' linear, dynamic or yarn), next to the unscaled one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoConfig

from hf_posvariants.evaluation.data import encode, load_tokenizer, read_corpus, split_held_out
from hf_posvariants.evaluation.length import (
    MODES,
    ROPE_SCALINGS,
    evaluate_lengths,
    length_tables,
    load_causal_lm,
    recorded_train_length,
    write_length_report,
)

DEFAULT_CORPUS = "../shared/data/war_and_peace/war_and_peace.txt"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="a text file (Gutenberg header/footer are stripped)")
    parser.add_argument("--held-out-fraction", type=float, default=0.1,
                        help="evaluate on this final fraction of the corpus (the part training should not have seen)")
    parser.add_argument("--tokenizer", help='"bytes", or a tokenizer folder (default: the checkpoint)')
    parser.add_argument("--train-length", type=int, help="default: the block_size in the checkpoint's run record "
                                                         "(run_args.json, written by scripts/train.py)")
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--stride-fraction", type=float, default=0.5, help="sliding-window stride / window length")
    parser.add_argument("--eval-tokens", type=int, help="tokens of held-out text scored at every length "
                                                         "(default: 4 windows of the longest length)")
    parser.add_argument("--rope-scaling", choices=ROPE_SCALINGS)
    parser.add_argument("--rope-factor", type=float, help="default: the largest multiple")
    parser.add_argument("--per-position-multiple", type=int, help="length (as a multiple) of the per-position "
                                                                  "loss curve; default: the largest")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--attn-implementation", default="auto",
                        help='"auto": flex_attention for encodings that add a score bias (ALiBi, T5, DeBERTa), which '
                             'keeps memory linear at 16k-64k tokens, SDPA otherwise; or force "sdpa", "eager", ...')
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/length"))
    args = parser.parse_args(argv)

    train_length = args.train_length or recorded_train_length(args.checkpoint)
    if train_length is None:
        train_length = AutoConfig.from_pretrained(args.checkpoint).max_position_embeddings
        print(f"{args.checkpoint} has no run record (run_args.json): taking max_position_embeddings={train_length} "
              "as the training length; pass --train-length if it was trained on shorter blocks.")
    lengths = [train_length * m for m in args.multiples]
    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    _, held_out = split_held_out(read_corpus(args.corpus), args.held_out_fraction)
    tokens = encode(held_out, tokenizer)[: args.eval_tokens or 4 * max(lengths)]
    curve_length = train_length * (args.per_position_multiple or max(args.multiples))

    variants = {"as trained": None}
    if args.rope_scaling:
        variants[f"{args.rope_scaling}×{args.rope_factor or max(args.multiples):g}"] = args.rope_scaling
    runs = {}
    for name, scaling in variants.items():
        model = load_causal_lm(args.checkpoint, scaling, args.rope_factor or max(args.multiples), train_length,
                               args.attn_implementation)
        runs[name] = evaluate_lengths(model, tokens, lengths, args.modes, args.stride_fraction, args.batch_size,
                                      curve_length)
    result = {"checkpoint": args.checkpoint, "corpus": args.corpus, "train_length": train_length,
              "eval_tokens": tokens.numel(), "runs": runs}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "length.json").write_text(json.dumps(result, indent=2))
    write_length_report(runs, args.out_dir, train_length, f"Length extrapolation of {Path(args.checkpoint).name}")
    print(f"Perplexity of {args.checkpoint} at multiples of its training length {train_length} (– = unavailable):\n")
    print(length_tables(runs))
    print(f"wrote {args.out_dir}/length.json, length.md, length.png, per_position.png")
    return result


if __name__ == "__main__":
    main()
