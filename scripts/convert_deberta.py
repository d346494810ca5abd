"""Convert a transformers DeBERTa-v2/v3 checkpoint (DebertaV2ForMaskedLM or DebertaV2Model) to posvar_deberta.

    python scripts/convert_deberta.py path/to/deberta-v3-base out/posvar-deberta-v3-base [--emd-layers 2]

The input is a local directory as written by `save_pretrained` (the Hub is not needed). A masked-LM
checkpoint becomes `PosVarDebertaForMaskedLM`, a bare encoder `PosVarDebertaModel`; the output loads
with `AutoModelForMaskedLM` / `AutoModel` once `hf_posvariants` is imported. With `--emd-layers 0` (the
default) logits equal transformers'; with more, the Enhanced Mask Decoder's position table starts untrained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoConfig, AutoTokenizer, DebertaV2ForMaskedLM, DebertaV2Model  # noqa: E402

from hf_posvariants.conversion import convert_deberta  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="directory of a DebertaV2ForMaskedLM or DebertaV2Model checkpoint")
    parser.add_argument("target", type=Path, help="directory to write the posvar_deberta checkpoint to")
    parser.add_argument("--emd-layers", type=int, default=0, help="Enhanced Mask Decoder depth (0 = off)")
    args = parser.parse_args()

    architectures = AutoConfig.from_pretrained(args.source).architectures or []
    model_class = DebertaV2ForMaskedLM if "DebertaV2ForMaskedLM" in architectures else DebertaV2Model
    converted = convert_deberta(model_class.from_pretrained(args.source), emd_layers=args.emd_layers)
    converted.save_pretrained(args.target)
    try:
        AutoTokenizer.from_pretrained(args.source).save_pretrained(args.target)
    except (OSError, ValueError) as error:  # a checkpoint without tokenizer files converts all the same
        print(f"no tokenizer copied: {error}")
    print(f"wrote {type(converted).__name__} to {args.target}")


if __name__ == "__main__":
    main()
