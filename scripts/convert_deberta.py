"""Convert a transformers DeBERTa-v2/v3 checkpoint (DebertaV2ForMaskedLM or DebertaV2Model) to posvar_deberta.

    python scripts/convert_deberta.py path/to/deberta-v3-base out/posvar-deberta-v3-base [--emd-layers 2] [--overwrite]

The input is a local directory as written by `save_pretrained` (the Hub is not needed). A masked-LM
checkpoint becomes `PosVarDebertaForMaskedLM`, a bare encoder `PosVarDebertaModel`; the output loads
with `AutoModelForMaskedLM` / `AutoModel` once `hf_posvariants` is imported. With `--emd-layers 0` (the
default) logits equal transformers'; with more, the Enhanced Mask Decoder's position table starts untrained.
The output must be new or empty (`--overwrite` replaces an earlier conversion; a folder holding anything but model
files, the source or the current directory is never replaced); the conversion is written beside it and renamed
into place, so a killed conversion leaves no half-written output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoConfig, AutoTokenizer, DebertaV2ForMaskedLM, DebertaV2Model  # noqa: E402

from hf_posvariants.conversion import convert_deberta  # noqa: E402
from hf_posvariants.conversion.output import model_folder_written  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="directory of a DebertaV2ForMaskedLM or DebertaV2Model checkpoint")
    parser.add_argument("output", type=Path, help="directory to write the posvar_deberta checkpoint to (new or empty)")
    parser.add_argument("--emd-layers", type=int, default=0, help="Enhanced Mask Decoder depth (0 = off)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT when it holds an earlier conversion (model files only)")
    args = parser.parse_args(argv)
    try:
        with model_folder_written(args.source, args.output, args.overwrite) as partial:
            architectures = AutoConfig.from_pretrained(args.source).architectures or []
            model_class = DebertaV2ForMaskedLM if "DebertaV2ForMaskedLM" in architectures else DebertaV2Model
            converted = convert_deberta(model_class.from_pretrained(args.source), emd_layers=args.emd_layers)
            converted.save_pretrained(partial)
            try:
                AutoTokenizer.from_pretrained(args.source).save_pretrained(partial)
            except (OSError, ValueError) as error:  # a checkpoint without tokenizer files converts all the same
                print(f"no tokenizer copied: {error}")
    except ValueError as error:
        print(f"convert_deberta: {error}", file=sys.stderr)
        return 2
    print(f"wrote {type(converted).__name__} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
