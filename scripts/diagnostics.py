"""Attention diagnostics of a causal checkpoint: mean attention distance and entropy per layer and
head (eager kernel, output_attentions), and λ of differential attention layers when present.

    PYTHONPATH=$PWD python scripts/diagnostics.py CHECKPOINT --length 256 --out-dir outputs/diagnostics
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from hf_posvariants.evaluation.data import blocks, encode, load_tokenizer, read_corpus, split_held_out
from hf_posvariants.evaluation.diagnostics import attention_statistics, differential_lambdas, write_diagnostics_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--corpus", default="../shared/data/war_and_peace/war_and_peace.txt")
    parser.add_argument("--held-out-fraction", type=float, default=0.1)
    parser.add_argument("--tokenizer", help='"bytes", or a tokenizer folder (default: the checkpoint)')
    parser.add_argument("--length", type=int, help="tokens per sequence (default: max_position_embeddings)")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/diagnostics"))
    args = parser.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, attn_implementation="eager").eval()
    tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    _, held_out = split_held_out(read_corpus(args.corpus), args.held_out_fraction)
    length = args.length or model.config.max_position_embeddings
    input_ids = blocks(encode(held_out, tokenizer), length, args.sequences)
    result = {"checkpoint": args.checkpoint, "length": length, "sequences": len(input_ids),
              "attention": attention_statistics(model, input_ids), "lambdas": differential_lambdas(model)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "diagnostics.json").write_text(json.dumps(result, indent=2))
    write_diagnostics_report(result["attention"], result["lambdas"], args.out_dir, Path(args.checkpoint).name)
    print(f"wrote {args.out_dir}/diagnostics.json, diagnostics.md, diagnostics.png")
    return result


if __name__ == "__main__":
    main()
