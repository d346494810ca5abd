"""Side-by-side comparison of variants under one budget: a base training recipe plus per-variant overrides.

Every trained variant runs through `hf_posvariants.training.pipeline` (the same tokenizer handling,
packing, Trainer, logging and export as `scripts/train.py`) from a recipe that is the `base:` recipe
(keys exactly those of `configs/*.yaml`) with the variant's overrides merged in (its `model:` keys into
the base's `model:`). Every variant sees the same blocks of the same text in the same order (one seed),
for the same number of steps, with parameter counts matched to the variant without position parameters
within a tolerance (by shrinking the feed-forward width of variants that carry a position table). Then
each is evaluated at multiples of the training length and on the position probes, and one report ranks
them. Evaluation-only variants (`from: <trained variant>` plus a RoPE scaling) reuse a trained
checkpoint, e.g. rope with YaRN applied at evaluation time.

The `data:` section says how the study cuts its corpus: the end of the text is held out, and the two
parts are written as one JSON-lines document each (so the pipeline packs the text as one contiguous
stream), beside the tokenizer, under `output_dir/data/`.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from hf_posvariants.evaluation.data import encode, load_tokenizer, read_corpus, split_held_out
from hf_posvariants.evaluation.length import evaluate_lengths, load_causal_lm, write_length_report
from hf_posvariants.evaluation.probes import probe_sweep, write_probe_report
from hf_posvariants.evaluation.report import line_plot, markdown_table
from hf_posvariants.training import pipeline
from hf_posvariants.training.recipes import MODEL_SECTION, config_class_of, load_yaml

RECIPE_SECTIONS = ("output_dir", "data", "base", "variants", "evaluation", "probes", "parameter_tolerance", "workers")
# Base-recipe keys the study sets itself, per variant.
STUDY_KEYS = ("output_dir", "train_file", "validation_file", "tokenizer_name", "torch_num_threads")
EVALUATION_ONLY_KEYS = ("from", "eval_rope_scaling", "eval_rope_factor")


@dataclass
class Variant:
    name: str
    overrides: dict  # merged into the base recipe
    parent: str | None = None  # evaluation-only variants: the trained variant whose weights they reuse
    rope_scaling: str | None = None
    rope_factor: float | None = None
    result: dict = field(default_factory=dict)


def load_recipe(path: str | Path) -> dict:
    recipe = load_yaml(Path(path).read_text(), str(path))
    unknown = sorted(set(recipe) - set(RECIPE_SECTIONS))
    if unknown:
        raise ValueError(f"recipe keys {unknown} are not supported; allowed keys are {list(RECIPE_SECTIONS)}.")
    claimed = sorted(set(recipe.get("base") or {}) & set(STUDY_KEYS))
    if claimed:
        raise ValueError(f"base keys {claimed} are set by the study for each variant; remove them from the recipe.")
    return recipe


def merged_recipe(base: dict, overrides: dict) -> dict:
    """The base recipe with a variant's overrides: flat keys replace, `model:` keys merge."""
    recipe = copy.deepcopy(base)
    for key, value in overrides.items():
        if key == MODEL_SECTION:
            recipe[MODEL_SECTION] = {**recipe.get(MODEL_SECTION, {}), **value}
        else:
            recipe[key] = value
    return recipe


def parse_variants(recipe: dict) -> list[Variant]:
    variants = []
    for name, spec in recipe["variants"].items():
        spec = dict(spec or {})
        parent = spec.pop("from", None)
        scaling = spec.pop("eval_rope_scaling", None)
        factor = spec.pop("eval_rope_factor", None)
        if parent is not None and parent not in recipe["variants"]:
            raise ValueError(f"variants.{name}.from={parent!r} is not a variant; allowed values are "
                             f"{sorted(recipe['variants'])}.")
        if parent is not None and spec:
            raise ValueError(f"variants.{name} evaluates {parent!r}'s weights; keys {sorted(spec)} would not apply. "
                             f"Allowed keys are {list(EVALUATION_ONLY_KEYS)}.")
        variants.append(Variant(name, spec, parent, scaling, factor))
    return sorted(variants, key=lambda variant: variant.parent is not None)  # trained ones first


def count_parameters(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return sum(p.numel() for p in model.parameters())


def matched_fields(config_class, fields: dict, reference: int, tolerance: float) -> tuple[dict, int]:
    """The fields, with intermediate_size reduced just enough to bring the parameter count within
    `tolerance` of `reference` (a position table adds parameters the others do not have)."""
    count = count_parameters(config_class(**fields))
    if abs(count - reference) <= tolerance * reference:
        return fields, count
    width = config_class(**fields).intermediate_size
    per_unit = count - count_parameters(config_class(**{**fields, "intermediate_size": width - 1}))
    fields = {**fields, "intermediate_size": width - math.ceil((count - reference) / per_unit)}
    return fields, count_parameters(config_class(**fields))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished workers: on a shared machine, the honest
    measure of work."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclass
class Study:
    """What every variant shares: the base recipe, data files, held-out text, budget."""

    recipe: dict
    out_dir: Path
    base: dict  # the base recipe with the study's data files and tokenizer filled in
    tokenizer: object
    held_out: torch.LongTensor
    train_length: int
    lengths: list[int]
    reference: int
    tolerance: float


def write_document(path: Path, text: str) -> str:
    """One JSON-lines record: the pipeline packs it as one stream, with no separators inside."""
    path.write_text(json.dumps({"text": text}) + "\n")
    return str(path)


def text_of_tokens(text: str, tokens: int, tokenizer) -> str:
    """The shortest prefix of `text` that encodes to at least `tokens` tokens (all of it if shorter)."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high) // 2
        if encode(text[:middle], tokenizer).numel() >= tokens:
            high = middle
        else:
            low = middle + 1
    return text[:low]


def prepare_study(recipe: dict, root: Path, write_files: bool = True) -> Study:
    data, base = recipe["data"], copy.deepcopy(recipe["base"])
    out_dir = root / recipe["output_dir"]
    data_dir = out_dir / "data"
    tokenizer = load_tokenizer(data.get("tokenizer", "bytes"))
    train_text, held_out_text = split_held_out(read_corpus(root / data["corpus"]), data["held_out_fraction"])
    train_length = base.get("block_size", pipeline.DataArguments.block_size)
    lengths = [train_length * m for m in recipe["evaluation"]["multiples"]]
    eval_tokens = recipe["evaluation"].get("eval_tokens", 4 * max(lengths))
    held_out = encode(held_out_text, tokenizer)[:eval_tokens]
    if write_files:
        data_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(data_dir / "tokenizer")
        write_document(data_dir / "train.jsonl", train_text)
        # The Trainer's evaluation sees the same held-out tokens as ours at the training length.
        write_document(data_dir / "validation.jsonl", text_of_tokens(held_out_text, eval_tokens, tokenizer))
    base.update(train_file=str(data_dir / "train.jsonl"), validation_file=str(data_dir / "validation.jsonl"),
                tokenizer_name=str(data_dir / "tokenizer"))
    model_fields = base.setdefault(MODEL_SECTION, {})
    model_fields.setdefault("vocab_size", len(tokenizer))  # the parameter counts below need it
    reference = count_parameters(config_class_for(base)(**{**model_fields, "position_encoding": "nope"}))
    return Study(recipe, out_dir, base, tokenizer, held_out, train_length, lengths, reference,
                 recipe.get("parameter_tolerance", 0.02))


def config_class_for(recipe: dict) -> type:
    return config_class_of(recipe.get("model_type", pipeline.ModelArguments.model_type))


def train_variant(study: Study, variant: Variant, threads: int, log=print) -> dict:
    """Train one variant through the pipeline; returns its parameter count, wall time, losses."""
    variant_dir = study.out_dir / variant.name
    recipe = merged_recipe(study.base, variant.overrides)
    config_class = config_class_for(recipe)
    recipe[MODEL_SECTION], parameters = matched_fields(config_class, recipe[MODEL_SECTION], study.reference,
                                                       study.tolerance)
    recipe.update(output_dir=str(variant_dir), torch_num_threads=threads)
    # Beside the run, not in it: the pipeline decides what may already be in its output_dir.
    recipe_path = study.out_dir / "recipes" / f"{variant.name}.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    intermediate_size = config_class(**recipe[MODEL_SECTION]).intermediate_size
    log(f"[{variant.name}] training: {parameters:,} parameters, intermediate_size {intermediate_size}")
    metrics = pipeline.main([str(recipe_path)])
    state = json.loads((variant_dir / "trainer_state.json").read_text())
    history = [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]
    return {"parameters": parameters, "intermediate_size": intermediate_size,
            "parameter_deviation": (parameters - study.reference) / study.reference,
            "train_seconds": metrics["train_runtime"], "trainer_eval_loss": metrics["eval_loss"],
            "loss_history": history}


def run_variant(study: Study, variant: Variant, parent_result: dict | None = None, threads: int = 1,
                log=print) -> dict:
    """Train the variant (or load its parent's checkpoint with an evaluation-time RoPE scaling), then
    evaluate it at every length and on the probes; returns its result."""
    evaluation, probes = study.recipe["evaluation"], study.recipe.get("probes")
    if variant.parent is None:
        result = train_variant(study, variant, threads, log)
        model = load_causal_lm(str(study.out_dir / variant.name))
    else:
        result = {k: parent_result[k] for k in ("parameters", "intermediate_size", "parameter_deviation",
                                                "train_seconds")}
        factor = variant.rope_factor or max(evaluation["multiples"])
        model = load_causal_lm(str(study.out_dir / variant.parent), variant.rope_scaling, factor, study.train_length)
    log(f"[{variant.name}] evaluating at {study.lengths}")
    result["length"] = evaluate_lengths(
        model, study.held_out, study.lengths, evaluation.get("modes", ["nonoverlapping", "sliding"]),
        evaluation.get("stride_fraction", 0.5), evaluation.get("batch_size", 4), max(study.lengths))
    if probes:
        result["probes"] = probe_sweep(model, study.tokenizer, probes["tasks"], probes["lengths"],
                                       probes.get("depths", [0.5]), probes.get("examples", 16))
    return result


def run_variant_in_worker(recipe: dict, root: Path, variant: Variant, parent_result: dict | None, threads: int) -> dict:
    """Entry point of a worker process: one variant, on its share of the cores."""
    torch.set_num_threads(threads)
    return run_variant(prepare_study(recipe, root, write_files=False), variant, parent_result, threads)


def run_compare(recipe: dict, root: Path = Path("."), log=print) -> dict:
    """Run every variant, `workers` at a time (separate processes splitting the cores between them:
    small models use one core far better than two), and write the report."""
    workers = recipe.get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is not supported; allowed values are whole numbers from 1.")
    wall_start, cpu_start = time.perf_counter(), cpu_seconds()
    study = prepare_study(recipe, root)
    variants = parse_variants(recipe)  # trained ones first
    results = {v.name: v.result for v in variants}  # filled in place below
    threads = torch.get_num_threads() if workers == 1 else max(1, torch.get_num_threads() // workers)
    if workers == 1:
        for variant in variants:
            variant.result.update(run_variant(study, variant, results.get(variant.parent), threads, log))
    else:
        context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            # Evaluation-only variants need their parent's checkpoint: they wait for the trained batch.
            for batch in ([v for v in variants if v.parent is None], [v for v in variants if v.parent is not None]):
                futures = [pool.submit(run_variant_in_worker, recipe, root, v, results.get(v.parent), threads)
                           for v in batch]
                for variant, future in zip(batch, futures):
                    variant.result.update(future.result())
    budget = {"wall_seconds": time.perf_counter() - wall_start, "cpu_seconds": cpu_seconds() - cpu_start,
              "workers": workers, "threads_per_worker": threads}
    log(f"total: {budget['wall_seconds']:.0f} s wall, {budget['cpu_seconds']:.0f} s CPU, {workers} worker(s) × "
        f"{budget['threads_per_worker']} thread(s)")
    (study.out_dir / "compare.json").write_text(json.dumps(
        {"recipe": recipe, "reference_parameters": study.reference, "budget": budget, "results": results},
        indent=2))
    write_compare_report(results, study.out_dir, study.train_length, study.tolerance, study.reference)
    return results


def rewrite_report(out_dir: Path) -> None:
    """Write the report again from compare.json (after a change to the report, without retraining)."""
    saved = json.loads((out_dir / "compare.json").read_text())
    train_length = saved["recipe"]["base"].get("block_size", pipeline.DataArguments.block_size)
    write_compare_report(saved["results"], out_dir, train_length, saved["recipe"].get("parameter_tolerance", 0.02),
                         saved["reference_parameters"])


def perplexity_at(result: dict, length: int, mode: str = "nonoverlapping") -> float | None:
    match = [r for r in result["length"]["results"] if r["length"] == length and r["mode"] == mode]
    return match[0]["perplexity"] if match else None


def ranking(results: dict, longest: int, train_length: int) -> list[tuple[str, float | None, float | None]]:
    """Variants ordered by perplexity at the longest length; unavailable ones last."""
    rows = [(name, perplexity_at(r, train_length), perplexity_at(r, longest)) for name, r in results.items()]
    return sorted(rows, key=lambda row: (row[2] is None, row[2] if row[2] is not None else math.inf))


def write_compare_report(results: dict, out_dir: Path, train_length: int, tolerance: float, reference: int) -> None:
    lengths = sorted({r["length"] for result in results.values() for r in result["length"]["results"]})
    longest = max(lengths)
    text = ["# Position encodings compared", "",
            f"Trained at {train_length} tokens; ranked by non-overlapping perplexity at {longest} tokens "
            f"({longest // train_length}× the training length). – = unavailable (a position table shorter than the "
            "sequence).", "", "## Ranking", ""]
    rank_rows = []
    for place, (name, short, long) in enumerate(ranking(results, longest, train_length), start=1):
        ratio = long / short if long is not None and short else None
        result = results[name]
        rank_rows.append([place, name, short, long, ratio, f"{result['parameters']:,}",
                          f"{100 * result['parameter_deviation']:+.2f}%", result["intermediate_size"],
                          f"{result['train_seconds']:.0f}"])
    text.append(markdown_table(["rank", "variant", f"ppl @{train_length}", f"ppl @{longest}",
                                f"@{longest} / @{train_length}", "parameters",
                                f"vs no-position ({reference:,}; tolerance {tolerance:.0%})", "ffn width",
                                "train s"], rank_rows))
    consistency = [[name, f"{r['trainer_eval_loss']:.6f}", f"{math.log(perplexity_at(r, train_length)):.6f}"]
                   for name, r in results.items() if "trainer_eval_loss" in r]
    text += ["## Check: Trainer eval loss vs our non-overlapping loss at the training length", "",
             markdown_table(["variant", "Trainer eval_loss", "ours"], consistency)]
    text += ["## Plots and tables", "", "- perplexity against length: `length.png`, every number in `length.md`;",
             "- loss by position at the longest length: `per_position.png`;", "- training loss: `training_loss.png`;",
             "- position probes (when the recipe has them): `probes.png`, `probes.md`.", "",
             "![perplexity against length](length.png)", ""]
    (out_dir / "compare.md").write_text("\n".join(text))
    write_length_report({name: r["length"] for name, r in results.items()}, out_dir, train_length,
                        "Perplexity against evaluation length")
    if any("probes" in r for r in results.values()):
        write_probe_report({name: r["probes"] for name, r in results.items() if "probes" in r}, out_dir)
    histories = {name: r["loss_history"] for name, r in results.items() if r.get("loss_history")}
    if histories:
        line_plot({name: tuple(zip(*history)) for name, history in histories.items()}, out_dir / "training_loss.png",
                  "Training loss", "step", "loss (nats)")
