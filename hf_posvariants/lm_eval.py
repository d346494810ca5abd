"""EleutherAI's lm-evaluation-harness with the posvariants families registered, so `pretrained=FOLDER` loads a
trained folder without `trust_remote_code`:

    python -m hf_posvariants.lm_eval --model hf --model_args pretrained=runs/tiny_clm,max_length=128 --tasks wikitext

(also installed as the `posvar-lm-eval` command). It imports the package, then runs `python -m lm_eval` with the same
arguments. Pass `max_length` = the trained block size (the folder's tokenizer `model_max_length`): without it the
harness scores windows of `max_position_embeddings`, which recipes set beyond the trained length.
"""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    """Run lm-evaluation-harness's command line (`argv`, else this process's arguments) with the families registered."""
    import hf_posvariants  # noqa: F401  (registers the families with the Auto classes)

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SystemExit("lm-evaluation-harness is not installed: pip install lm-eval") from None
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    runpy.run_module("lm_eval", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
