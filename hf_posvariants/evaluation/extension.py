"""Context extension of a pretrained decoder: a `LlamaForCausalLM` (or posvar_llama) checkpoint becomes a posvar_llama
whose RoPE is rescaled for a longer context, is fine-tuned at the longer block by the training pipeline, and is scored
before and after at the original and the extended length. Instead of rescaling RoPE, the model can switch to another
(unbounded) position encoding and learn it in the fine-tune.

    python scripts/extend_context.py CHECKPOINT configs/extend/tiny_llama.yaml --rope-scaling yarn --factor 4

The weights load as they are (`conversion.llama`); the rescaling is the evaluation's (`length.scaled_rope_parameters`,
transformers' own RoPE functions): linear (position interpolation, Chen et al. 2023), dynamic NTK, YaRN (Peng et al.
2023) or Llama 3's. This module drives the pipeline and the length evaluation through their public entry points.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..conversion.llama import convert_llama_checkpoint
from ..conversion.output import check_destination, model_folder_written
from ..position_encodings import POSITION_ENCODINGS, selectable_position_encodings
from ..training import pipeline
from ..training.data import load_splits, pack_blocks, text_column_of
from .length import evaluate_lengths, scaled_rope_parameters
from .probes import probe_sweep

PROBE_TASKS = ["passkey", "copy", "associative_recall"]


def extend_config(folder: Path, factor: float, rope_type: str | None = None, encoding: str | None = None) -> tuple[int, int]:
    """Give the posvar_llama config in `folder` a context `factor` × longer, by rescaling its RoPE (`rope_type`) or by
    switching to another position `encoding`; returns (original, extended) lengths."""
    if (rope_type is None) == (encoding is None):
        raise ValueError(f"give exactly one of rope_scaling={rope_type!r} and encoding={encoding!r}.")
    config = AutoConfig.from_pretrained(folder)
    original, longer = config.max_position_embeddings, int(config.max_position_embeddings * factor)
    if encoding is not None:
        unbounded = [name for name in selectable_position_encodings() if not POSITION_ENCODINGS[name].bounded]
        if encoding not in unbounded:
            raise ValueError(
                f"encoding={encoding!r} is not supported for context extension; allowed values are {sorted(unbounded)} "
                "(an encoding with a table of positions would meet the extended ones untrained)."
            )
        config.position_encoding, config.max_position_embeddings = encoding, longer
    else:
        if config.position_encoding != "rope":
            raise ValueError(
                f"context extension rescales RoPE, but position_encoding={config.position_encoding!r}; allowed "
                "encodings are ['rope'] (or switch the encoding instead)."
            )
        config.rope_parameters = scaled_rope_parameters(config.rope_parameters, rope_type, factor, original)
        # Dynamic NTK rescales once a sequence exceeds max_position_embeddings, so that stays the trained length.
        config.max_position_embeddings = original if rope_type == "dynamic" else longer
    config.validate_architecture()
    config.save_pretrained(folder)
    return original, longer


def held_out_tokens(recipe_argv: list[str], tokenizer, max_tokens: int) -> torch.LongTensor:
    """The recipe's validation split as one token stream, packed as the pipeline packs it for training (texts
    joined by the tokenizer's separator): text the fine-tuning did not train on."""
    _, data_args, training_args, _ = pipeline.parse(recipe_argv)
    splits = load_splits(data_args.dataset_name, data_args.dataset_config_name, data_args.train_file,
                         data_args.validation_file, data_args.validation_fraction, training_args.seed,
                         data_args.builtin_examples)
    packed = pack_blocks(splits, tokenizer, text_column_of(splits["train"], data_args.text_column), data_args.block_size)
    return torch.tensor(packed["validation"]["input_ids"], dtype=torch.long).flatten()[:max_tokens]


def score(folder: Path, tokens: torch.LongTensor, lengths: list[int], probe_examples: int) -> tuple[dict, dict]:
    """Perplexity of the causal LM in `folder` over consecutive blocks of each length, and its accuracy on the
    position probes (passkey, copy, associative recall) at each length."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    results = evaluate_lengths(model, tokens, lengths, modes=("nonoverlapping",))["results"]
    probes = {}
    if probe_examples:
        rows = probe_sweep(model, AutoTokenizer.from_pretrained(folder), PROBE_TASKS, lengths, [0.5], probe_examples)
        probes = {f"{row['task']} @ {row['length']}": row["accuracy"] for row in rows}
    return {row["length"]: row["perplexity"] for row in results}, probes


def extend(
    checkpoint: str | Path,
    recipe: str | Path,
    factor: float,
    out_dir: Path,
    rope_type: str | None = None,
    encoding: str | None = None,
    overrides: list[str] = (),
    tokenizer: str | None = None,
    eval_tokens: int = 8192,
    probe_examples: int = 8,
    overwrite: bool = False,
) -> dict:
    """Convert, rescale RoPE by `rope_type` (or switch to `encoding`), fine-tune at factor × the trained length and
    score the three stages (perplexity on the recipe's validation text, and the position probes with
    `probe_examples` examples per task and length); writes `extension.json` and `extension.md` to `out_dir` and
    returns the report. The converted and changed models' folders are written as `conversion.output` says: an
    earlier extension's are replaced only with `overwrite`."""
    out_dir = Path(out_dir)
    converted, changed, extended = out_dir / "converted", out_dir / "changed", out_dir / "extended"
    check_destination(checkpoint, changed, overwrite, "out_dir")  # both refused before any work
    convert_llama_checkpoint(checkpoint, converted, tokenizer, overwrite, "out_dir")
    with model_folder_written(converted, changed, overwrite, "out_dir") as partial:
        shutil.copytree(converted, partial, dirs_exist_ok=True)
        original, longer = extend_config(partial, factor, rope_type, encoding)
    recipe_argv = [str(recipe), "--model_name_or_path", str(changed), "--block_size", str(longer),
                   "--output_dir", str(extended), *overrides]  # fmt: skip
    tokens = held_out_tokens(recipe_argv, AutoTokenizer.from_pretrained(converted), eval_tokens)
    lengths = [original, longer]
    change = f"{rope_type} ×{factor:g}" if encoding is None else f"{encoding} in place of rope"
    stages = {"as trained": converted, f"{change}, no fine-tuning": changed}
    scores = {stage: score(folder, tokens, lengths, probe_examples) for stage, folder in stages.items()}
    metrics = pipeline.main(recipe_argv)
    scores[f"{change}, fine-tuned at {longer}"] = score(extended, tokens, lengths, probe_examples)
    report = {"checkpoint": str(checkpoint), "rope_scaling": rope_type, "encoding": encoding, "factor": factor,
              "original_length": original, "extended_length": longer, "eval_tokens": int(tokens.numel()),
              "perplexity": {stage: perplexity for stage, (perplexity, _) in scores.items()},
              "probes": {stage: probes for stage, (_, probes) in scores.items()},
              "fine_tuning": {key: metrics[key] for key in ("train_loss", "eval_loss") if key in metrics},
              "model": str(extended)}  # fmt: skip
    write_report(report, out_dir)
    return report


def write_report(report: dict, out_dir: Path) -> None:
    """extension.md: perplexity and probe accuracy per stage; extension.json: the whole report."""
    lengths = [report["original_length"], report["extended_length"]]
    columns = [f"perplexity at {length}" for length in lengths] + list(next(iter(report["probes"].values())))
    rows = ["| stage | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for stage, by_length in report["perplexity"].items():
        cells = [f"{by_length[length]:.3f}" for length in lengths]
        cells += ["n/a" if value is None else f"{value:.2f}" for value in report["probes"][stage].values()]
        rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    (out_dir / "extension.md").write_text("\n".join(rows) + "\n")
    (out_dir / "extension.json").write_text(json.dumps(report, indent=2))
