"""EleutherAI's lm-evaluation-harness with the posvariants families registered, so `pretrained=FOLDER` loads a
trained folder without `trust_remote_code`:

    python -m hf_posvariants.lm_eval --model hf --model_args pretrained=runs/tiny_clm,max_length=128 --tasks wikitext

(also installed as the `posvar-lm-eval` command). It imports the package, then runs `python -m lm_eval` with the same
arguments. Pass `max_length` = the trained block size (the folder's tokenizer `model_max_length`): without it the
harness scores windows of `max_position_embeddings`, which recipes set beyond the trained length, and this command
warns, as it does for a `max_length` beyond the trained length.
"""

from __future__ import annotations

import json
import runpy
import sys
import warnings
from pathlib import Path

from .training.hub import read_json
from .training.run_folder import RUN_RECORD_FILE

# transformers' model_max_length of a tokenizer that sets none is int(1e30): no length at all.
UNSET_LENGTH = int(1e29)


def main(argv: list[str] | None = None) -> None:
    """Run lm-evaluation-harness's command line (`argv`, else this process's arguments) with the families registered."""
    import hf_posvariants  # noqa: F401  (registers the families with the Auto classes)

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SystemExit("lm-evaluation-harness is not installed: pip install lm-eval") from None
    argv = sys.argv[1:] if argv is None else argv
    warn_beyond_trained_length(model_args(argv))
    sys.argv = ["lm_eval", *argv]
    runpy.run_module("lm_eval", run_name="__main__", alter_sys=True)


def model_args(argv: list[str]) -> dict[str, str]:
    """The `--model_args` (`-a`) of a harness command line: `key=value,...` words or a JSON object. The harness
    parses them itself; what this cannot read is left out."""
    values = []
    for index, argument in enumerate(argv):
        if argument.startswith("--model_args="):
            values.append(argument.split("=", 1)[1])
        elif argument in ("--model_args", "-a"):
            following = argv[index + 1 :]
            values += following[: next((i for i, word in enumerate(following) if word.startswith("-")), len(following))]
    found = {}
    for value in values:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = dict(pair.split("=", 1) for pair in value.split(",") if "=" in pair)
        if isinstance(parsed, dict):
            found.update({key: str(item) for key, item in parsed.items()})
    return found


def trained_length(folder: Path) -> int | None:
    """The block size a folder was trained at: its run record's `block_size`, else its tokenizer's
    `model_max_length` (None where neither says)."""
    record, tokenizer = (read_json(folder / name) for name in (RUN_RECORD_FILE, "tokenizer_config.json"))
    length = record.get("block_size") or tokenizer.get("model_max_length")
    return int(length) if isinstance(length, (int, float)) and length < UNSET_LENGTH else None


def warn_beyond_trained_length(arguments: dict[str, str]) -> None:
    """Warn when the harness would score windows longer than a local folder was trained on: a `max_length` above
    the trained length, or none (the harness then takes `max_position_embeddings`)."""
    folder = Path(arguments.get("pretrained", ""))
    length = trained_length(folder) if arguments.get("pretrained") and folder.is_dir() else None
    if length is None:
        return
    given, limit = arguments.get("max_length"), read_json(folder / "config.json").get("max_position_embeddings")
    if given is None and limit is not None and limit > length:
        window = f"with no max_length, lm-evaluation-harness scores windows of max_position_embeddings={limit} tokens"
    elif given is not None and given.isdigit() and int(given) > length:
        window = f"max_length={given} scores windows of {given} tokens"
    else:
        return
    warnings.warn(
        f"{window}, beyond the {length} that {str(folder)!r} was trained on: positions past {length} were "
        f"never trained, so the scores measure extrapolation. Pass max_length={length} for the trained length.",
        UserWarning,
        stacklevel=2,
    )


if __name__ == "__main__":
    main()
