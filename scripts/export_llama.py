#!/usr/bin/env python
"""Export a trained posvariants causal LM that is exactly a Llama as a plain `LlamaForCausalLM` folder.

    python scripts/export_llama.py runs/tiny_clm runs/tiny_clm-llama

The output loads with `AutoModelForCausalLM.from_pretrained(OUT)` in plain transformers (no hf_posvariants, no
`trust_remote_code`) and in any engine serving Llama (vLLM, TGI, SGLang, llama.cpp's converter). posvar_llama with
RoPE (any of transformers' scalings), standard attention and no per-layer schedule qualifies; anything else is
refused, naming each field that differs from a Llama. OUT must be new or empty (`--overwrite` replaces an earlier
export; a folder holding anything but model files is never replaced); the export is written beside it and renamed
into place, so a killed export leaves no half-written OUT.
"""

from __future__ import annotations

import argparse
import sys

import hf_posvariants  # noqa: F401  (registers the families, so the source folder loads)
from hf_posvariants.conversion import export_llama


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="posvariants causal-LM folder (written by scripts/train.py or save_pretrained)")
    parser.add_argument("output", help="folder to write the LlamaForCausalLM checkpoint to (new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT when it holds an earlier export (model files only)")
    args = parser.parse_args(argv)
    try:
        folder = export_llama(args.source, args.output, overwrite=args.overwrite)
    except ValueError as error:
        print(f"export_llama: {error}", file=sys.stderr)
        return 2
    print(f"wrote LlamaForCausalLM to {folder}; load it with AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
