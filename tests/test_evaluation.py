"""The measuring side on tiny models: every script writes its outputs, plots render, numbers are
finite, and known cases hold (Trainer eval loss, uniform attention, an oracle's probe accuracy)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from hf_posvariants import PosVarLlamaConfig
from hf_posvariants.evaluation import bench, data, diagnostics, length, probes
from hf_posvariants.evaluation.bench.measurement import build_model
from hf_posvariants.evaluation.compare import load_recipe, merged_recipe, parse_variants, rewrite_report, run_compare
from hf_posvariants.training.recipes import config_class_of

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
TRAIN_LENGTH = 16
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def script(name: str):
    """Import scripts/<name>.py as a module, so tests call its `main(argv)` in-process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000


def tiny_llama(position_encoding: str, **overrides) -> PosVarLlamaConfig:
    fields = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=TRAIN_LENGTH, position_encoding=position_encoding, pad_token_id=0)
    return PosVarLlamaConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "book.txt"
    lines = [f"Line {i}: {probes.FILLER * (1 + i % 3)}" for i in range(60)]
    path.write_text("*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n" + "\n".join(lines)
                    + "\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence text\n")
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for encoding in ("rope", "learned"):
        folder = tmp_path_factory.mktemp(encoding)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_llama(encoding)).save_pretrained(folder)
        data.byte_tokenizer().save_pretrained(folder)
        folders[encoding] = folder
    return folders


# ---- data --------------------------------------------------------------------------------------

def test_gutenberg_header_and_footer_are_stripped(corpus):
    text = data.read_corpus(corpus)
    assert text.startswith("Line 0") and "GUTENBERG" not in text and "licence" not in text


def test_fast_byte_encoding_matches_the_tokenizer():
    text = "War and peace — Война и мир\n"
    tokenizer = data.byte_tokenizer()
    assert data.encode(text, tokenizer).tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- length extrapolation ---------------------------------------------------------------------

def test_eval_length_writes_outputs_with_finite_numbers(checkpoints, corpus, tmp_path):
    result = script("eval_length").main([str(checkpoints["rope"]), "--corpus", str(corpus), "--multiples", "1", "2",
                                         "4", "--rope-scaling", "yarn", "--eval-tokens", "128", "--out-dir", str(tmp_path)])
    for name in ("length.json", "length.md"):
        assert (tmp_path / name).stat().st_size > 0
    for name in ("length.png", "per_position.png"):
        assert_png(tmp_path / name)
    saved = json.loads((tmp_path / "length.json").read_text())
    assert set(saved["runs"]) == {"as trained", "yarn×4"} == set(result["runs"])
    for run in saved["runs"].values():
        assert len(run["results"]) == 6  # 3 lengths × 2 modes
        assert all(r["status"] == "ok" and math.isfinite(r["perplexity"]) for r in run["results"])
        assert len(run["per_position"]["loss"]) == 4 * TRAIN_LENGTH - 1


def test_learned_table_is_unavailable_beyond_its_length_not_an_error(checkpoints, corpus):
    model = length.load_causal_lm(str(checkpoints["learned"]))
    tokens = data.encode(data.read_corpus(corpus), data.byte_tokenizer())[: 4 * TRAIN_LENGTH]
    results = length.evaluate_lengths(model, tokens, [TRAIN_LENGTH, 2 * TRAIN_LENGTH])["results"]
    assert [r["status"] == "ok" for r in results] == [True, True, False, False]
    assert all(r["perplexity"] is None for r in results[2:])


def test_perplexity_at_training_length_equals_trainer_eval_loss(checkpoints, corpus, tmp_path):
    model = length.load_causal_lm(str(checkpoints["rope"]))
    tokens = data.encode(data.read_corpus(corpus), data.byte_tokenizer())[:12 * TRAIN_LENGTH]
    ids = data.blocks(tokens, TRAIN_LENGTH).tolist()
    eval_dataset = Dataset.from_dict({"input_ids": ids, "labels": ids}).with_format("torch")
    arguments = TrainingArguments(str(tmp_path), per_device_eval_batch_size=8, use_cpu=True, report_to="none")
    trainer = Trainer(model=model, args=arguments, eval_dataset=eval_dataset,
                      data_collator=default_data_collator)
    eval_loss = trainer.evaluate()["eval_loss"]
    ours = length.evaluate_lengths(model, tokens, [TRAIN_LENGTH], ["nonoverlapping"], batch_size=3)["results"][0]
    assert ours["loss"] == pytest.approx(eval_loss, abs=1e-5)
    assert ours["tokens_scored"] == 12 * (TRAIN_LENGTH - 1)


def test_sliding_window_with_full_stride_is_non_overlapping(checkpoints, corpus):
    model = length.load_causal_lm(str(checkpoints["rope"]))
    tokens = data.encode(data.read_corpus(corpus), data.byte_tokenizer())[:6 * TRAIN_LENGTH]
    results = length.evaluate_lengths(model, tokens, [TRAIN_LENGTH], stride_fraction=1.0)["results"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-9)
    half = length.evaluate_lengths(model, tokens, [TRAIN_LENGTH], ["sliding"], stride_fraction=0.5)["results"][0]
    # Every target after the first window is scored once: (tokens − length) targets in later windows.
    assert half["tokens_scored"] == (TRAIN_LENGTH - 1) + (tokens.numel() - TRAIN_LENGTH)


@pytest.mark.parametrize("rope_type", length.ROPE_SCALINGS)
def test_evaluation_rescales_rope_as_context_extension_does(rope_type):
    """One rescaler: evaluation accepts every scaling the extension does (Llama 3's included), with its parameters."""
    scaled = length.rope_scaled_config(tiny_llama("rope"), rope_type, 4.0, TRAIN_LENGTH)
    original = tiny_llama("rope").rope_parameters
    assert scaled.rope_parameters == length.scaled_rope_parameters(original, rope_type, 4.0, TRAIN_LENGTH)
    scaled.validate_architecture()


def test_rope_scaling_is_refused_for_other_encodings_and_leaves_the_weights():
    with pytest.raises(ValueError, match="position_encoding='alibi'"):
        length.rope_scaled_config(tiny_llama("alibi"), "yarn", 4.0, TRAIN_LENGTH)
    with pytest.raises(ValueError, match="rope_scaling='ntk'"):
        length.rope_scaled_config(tiny_llama("rope"), "ntk", 4.0, TRAIN_LENGTH)
    scaled = length.rope_scaled_config(tiny_llama("rope"), "yarn", 4.0, TRAIN_LENGTH)
    assert scaled.rope_parameters["rope_type"] == "yarn"
    assert scaled.rope_parameters["original_max_position_embeddings"] == TRAIN_LENGTH


@pytest.mark.parametrize("encoding, expected", [("rope", "sdpa"), ("nope", "sdpa"), ("alibi", "flex_attention"),
                                                ("fire", "flex_attention"), ("cope", "sdpa")])
def test_long_context_backend_is_flex_only_for_a_score_bias_flex_can_carry(encoding, expected):
    config = tiny_llama(encoding)
    assert length.long_context_backend(config) == expected
    config.check_attention_backend(expected)
    assert length.long_context_backend(config, "eager") == "eager"


# ---- probes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(probes.PROBES))
def test_probe_examples_have_the_exact_length_and_the_answer_at_the_end(task):
    tokenizer = data.byte_tokenizer()
    for example in probes.render(task, tokenizer, 200, 3, depth=0.3):
        assert len(example.input_ids) == 200
        prompt, answer = (tokenizer.decode(ids) for ids in (example.input_ids[: example.answer_start],
                                                             example.input_ids[example.answer_start:]))
        assert answer and answer in prompt  # the answer is recoverable from the prompt


class Oracle(nn.Module):
    """Predicts each next token of its input perfectly (or, `wrong`, never)."""

    def __init__(self, vocab: int, wrong: bool = False):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kwargs):
        following = torch.roll(input_ids, -1, dims=1) + int(self.wrong)
        return type("Output", (), {"logits": nn.functional.one_hot(following % self.vocab, self.vocab).float()})


def test_probe_accuracy_of_an_oracle_is_one_and_of_its_opposite_zero():
    examples = probes.render("associative_recall", data.byte_tokenizer(), 64, 5)
    assert probes.accuracy(Oracle(259), examples, batch_size=2) == 1.0
    assert probes.accuracy(Oracle(259, wrong=True), examples, batch_size=2) == 0.0


def test_probes_script_writes_outputs(checkpoints, tmp_path):
    script("probes").main([str(checkpoints["learned"]), "--lengths", "16", "200", "--examples", "2",
                           "--depths", "0.5", "--out-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "probes.json").read_text())["runs"][checkpoints["learned"].name]
    assert_png(tmp_path / "probes.png")
    assert (tmp_path / "probes.md").read_text().startswith("# Position probes")
    assert all(r["accuracy"] is None for r in rows if r["length"] == 200)  # beyond the learned table
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows if r["status"] == "ok")


# ---- attention diagnostics ----------------------------------------------------------------------

def test_uniform_attention_has_the_closed_form_distance_and_entropy():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama("rope"), attn_implementation="eager").eval()
    for layer in model.model.layers:
        nn.init.zeros_(layer.self_attn.q_proj.weight)  # all scores 0: uniform over the causal prefix
    rows = diagnostics.attention_statistics(model, torch.randint(3, 259, (2, 12)))
    positions = torch.arange(12, dtype=torch.float64)
    assert len(rows) == 2 * 4
    for row in rows:
        assert row["mean_distance"] == pytest.approx((positions / 2).mean().item(), abs=1e-5)
        assert row["entropy"] == pytest.approx(torch.log(positions + 1).mean().item(), abs=1e-5)


def test_differential_lambda_is_read_from_modules_that_have_it():
    module = nn.Module()
    for name, value in (("q1", 0.5), ("k1", 0.2), ("q2", 0.1), ("k2", 0.3)):
        setattr(module, f"lambda_{name}", nn.Parameter(torch.full((4,), value)))
    module.lambda_init = 0.2
    holder = nn.ModuleDict({"attn": module})
    expected = math.exp(4 * 0.5 * 0.2) - math.exp(4 * 0.1 * 0.3) + 0.2
    assert diagnostics.differential_lambdas(holder) == [{"module": "attn", "lambda": pytest.approx(expected),
                                                        "lambda_init": 0.2}]
    assert diagnostics.differential_lambdas(nn.Linear(2, 2)) == []


def test_diagnostics_script_writes_outputs(checkpoints, corpus, tmp_path):
    result = script("diagnostics").main([str(checkpoints["rope"]), "--corpus", str(corpus), "--held-out-fraction",
                                         "0.5", "--out-dir", str(tmp_path)])
    assert_png(tmp_path / "diagnostics.png")
    assert len(result["attention"]) == 8 and result["lambdas"] == []
    assert all(math.isfinite(r["entropy"]) and 0 <= r["mean_distance"] < TRAIN_LENGTH for r in result["attention"])


# ---- compare --------------------------------------------------------------------------------------

def compare_recipe(corpus, tmp_path, output_dir: str = "out", workers: int = 1):
    recipe_path = tmp_path / f"{output_dir}.yaml"
    recipe_path.write_text(f"""
output_dir: {output_dir}
workers: {workers}
data: {{corpus: {corpus}, held_out_fraction: 0.2, tokenizer: bytes}}
base:
  model_type: posvar_llama
  block_size: {TRAIN_LENGTH}
  max_steps: 2
  per_device_train_batch_size: 4
  logging_steps: 1
  report_to: none
  disable_tqdm: true
  model: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4,
           max_position_embeddings: {TRAIN_LENGTH}}}
variants:
  learned: {{model: {{position_encoding: learned}}}}
  rope: {{model: {{position_encoding: rope}}}}
  rope+yarn: {{from: rope, eval_rope_scaling: yarn}}
evaluation: {{multiples: [1, 2], eval_tokens: 256}}
probes: {{tasks: [copy], lengths: [16], examples: 2}}
""")
    return load_recipe(recipe_path)


def test_compare_trains_evaluates_and_ranks(corpus, tmp_path):
    results = run_compare(compare_recipe(corpus, tmp_path), tmp_path, log=lambda *_: None)
    out = tmp_path / "out"
    for name in ("length.png", "per_position.png", "training_loss.png", "probes.png"):
        assert_png(out / name)
    report = (out / "compare.md").read_text()
    assert "## Ranking" in report and "rope+yarn" in report
    assert all(abs(r["parameter_deviation"]) <= 0.02 for r in results.values())
    for name in ("learned", "rope"):  # the known case, inside the real pipeline
        at_train_length = next(r for r in results[name]["length"]["results"] if r["mode"] == "nonoverlapping")
        assert at_train_length["loss"] == pytest.approx(results[name]["trainer_eval_loss"], abs=1e-5)
    assert results["learned"]["length"]["results"][-1]["status"].startswith("unavailable")
    (out / "compare.md").unlink()
    rewrite_report(out)  # the report alone, from compare.json
    assert (out / "compare.md").read_text() == report


def test_compare_in_two_worker_processes_matches_one_process(corpus, tmp_path):
    serial = run_compare(compare_recipe(corpus, tmp_path, "serial"), tmp_path, log=lambda *_: None)
    parallel = run_compare(compare_recipe(corpus, tmp_path, "parallel", workers=2), tmp_path, log=lambda *_: None)
    assert list(parallel) == list(serial)
    for name in serial:
        for ours, theirs in zip(parallel[name]["length"]["results"], serial[name]["length"]["results"]):
            assert ours["status"] == theirs["status"]
            if ours["perplexity"] is not None:
                assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-4)
    budget = json.loads((tmp_path / "parallel" / "compare.json").read_text())["budget"]
    assert budget["workers"] == 2 and budget["cpu_seconds"] > 0
    assert (tmp_path / "parallel" / "rope" / "model.safetensors").exists()
    assert (tmp_path / "parallel" / "recipes" / "rope.yaml").exists()  # what the pipeline ran


def test_compare_refuses_a_bad_worker_count(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"workers=0 is not supported"):
        run_compare(compare_recipe(corpus, tmp_path, workers=0), tmp_path, log=lambda *_: None)


def test_recipe_keys_are_checked(tmp_path):
    (tmp_path / "r.yaml").write_text("output_dir: x\ntrainer: {}\n")
    with pytest.raises(ValueError, match=r"recipe keys \['trainer'\]"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("output_dir: x\nbase: {train_file: a.txt}\n")
    with pytest.raises(ValueError, match=r"base keys \['train_file'\] are set by the study"):
        load_recipe(tmp_path / "r.yaml")


def test_a_variant_is_the_base_recipe_with_its_overrides():
    base = {"block_size": 16, "learning_rate": 0.1, "model": {"hidden_size": 32, "position_encoding": "rope"}}
    merged = merged_recipe(base, {"learning_rate": 0.2, "model": {"position_encoding": "alibi"}})
    assert merged == {"block_size": 16, "learning_rate": 0.2, "model": {"hidden_size": 32, "position_encoding": "alibi"}}
    assert base["model"]["position_encoding"] == "rope"  # the base is not modified


def test_an_evaluation_only_variant_refuses_training_keys():
    recipe = {"variants": {"rope": {}, "yarn": {"from": "rope", "model": {"position_encoding": "alibi"}}}}
    with pytest.raises(ValueError, match=r"variants.yarn evaluates 'rope'"):
        parse_variants(recipe)


def test_war_and_peace_recipe_comments_every_key():
    lines = (ROOT / "configs/compare/war_and_peace.yaml").read_text().splitlines()
    keyed = [line for line in lines if ":" in line and not line.lstrip().startswith("#")]
    assert keyed and all("#" in line for line in keyed)


# ---- speed benchmark ------------------------------------------------------------------------------

def test_bench_quick_prints_the_issue_ratios(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = script("bench").main(["--quick", "--families", "posvar_llama", "--encodings", "rope", "alibi",
                                       "t5_bias", "--tasks", "train", "--threads", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "bench.md").read_text().startswith("# Speed and memory")
    assert json.loads((tmp_path / "bench.json").read_text())["ratios"]
    names = {r["name"] for r in result["ratios"]}
    assert {"ours / LlamaForCausalLM time (sdpa)", "SDPA speed-up over eager (rope)", "alibi / rope time (sdpa)",
            "t5_bias / rope time (sdpa)"} <= names
    timed = [t for t in result["timings"] if t["error"] is None]
    assert all(t["median_ms"] > 0 and math.isfinite(t["median_ms"]) for t in timed)
    assert all(t["error"] is None for t in result["timings"])
    assert all(t["flops_per_step"] > 0 and t["achieved_tflops"] > 0 and t["mfu"] is None for t in timed)
    # MPT has no SDPA path in transformers: ours at SDPA is compared with what MPT's users get, eager.
    assert any(r["denominator"] == "MptForCausalLM@eager" and "(sdpa)" in r["name"] for r in result["ratios"])


def test_bench_kernel_cases_time_every_kernel_form(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = script("bench").main(["--case-set", "kernels", "--quick", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    forms = {(t["case"]["backend"], t["case"]["bias"], t["case"]["calls"], t["case"]["value_width"])
             for t in result["timings"]}
    assert forms == {(backend, *form) for backend in ("eager", "sdpa")
                     for form in (("none", 1, 1), ("mask", 1, 1), ("none", 2, 1), ("none", 1, 2))}
    assert all(t["error"] is None and t["median_ms"] > 0 for t in result["timings"])
    assert {r["name"] for r in result["ratios"]} >= {"SDPA speed-up over eager (causal)",
                                                      "differential, two calls / one wide call (sdpa)"}
    assert (tmp_path / "bench.md").read_text().startswith("# Attention kernels alone")


def test_bench_case_sets_pick_families_by_what_their_configs_declare():
    deberta = bench.deberta_case_set(["sdpa"])
    relative = {case.model_type for case in deberta.cases if case.source == "ours"}
    assert relative == set(bench.families_declaring("position_buckets")) == {"posvar_deberta"}
    assert bench.reference_case("DebertaV2ForMaskedLM", "masked", "sdpa").backend == "eager"  # eager-only upstream
    differential = bench.differential_case_set(["sdpa"])
    ours = [case for case in differential.cases if case.source == "ours"]
    assert {case.attention_variant for case in ours} == {"differential", "standard"}
    assert all(config_class_of(case.model_type)().attention_variant == "differential" for case in ours)


@pytest.mark.parametrize("case_set", ["deberta", "differential"])
def test_bench_case_sets_run_and_report_their_ratios(case_set, tmp_path):
    threads = torch.get_num_threads()
    try:
        result = script("bench").main(["--quick", "--case-set", case_set, "--backends", "sdpa", "--tasks", "train",
                                       "--threads", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert all(t["error"] is None for t in result["timings"])
    assert result["ratios"] and all(r["value"] > 0 for r in result["ratios"])


def test_flops_of_a_training_step_are_about_three_forwards_at_every_backend():
    shape = bench.BenchShape(32, 2, 4, 64, 97, 2)
    case = bench.Case("ours", "posvar_llama", "causal", "sdpa", "rope")
    runner = bench.Runner(case, shape, 16, "cpu")
    forward, train = (bench.model_flops(case, shape, 16, task, "cpu") for task in ("forward", "train"))
    linear = sum(m.weight.numel() for m in runner.model.modules() if isinstance(m, nn.Linear))
    tokens = shape.batch_size * 16
    attention = 2 * 2 * shape.num_hidden_layers * shape.hidden_size * 16 * tokens  # QKᵀ and AV, full square
    assert forward == 2 * linear * tokens + attention  # every projection and the two attention products
    assert 2.8 < train / forward < 3.2  # backward: two matmuls per forward matmul
    assert bench.count_flops(runner, "forward") < forward  # the fused CPU kernel is not counted: hence eager


def test_mfu_is_achieved_flops_over_the_peak():
    timing = bench.Timing(bench.Case("ours", "posvar_llama", "causal", "sdpa"), "train", 16, [0.5, 0.5], flops=10**12)
    assert timing.as_dict(peak_tflops=4.0)["achieved_tflops"] == pytest.approx(2.0)
    assert timing.as_dict(peak_tflops=4.0)["mfu"] == pytest.approx(0.5)
    assert timing.as_dict()["mfu"] is None  # no peak known: achieved FLOP/s only


def test_ratio_targets():
    assert bench.Ratio("r", "a", "b", 1, "train", 0.9, "≤1.00×").passes() is True
    assert bench.Ratio("r", "a", "b", 1, "train", 1.5, "≥2.00×").passes() is False
    assert bench.Ratio("r", "a", "b", 1, "train", None, "≥2.00×").passes() is None


@pytest.mark.slow
def test_cpu_peak_memory_grows_with_length():
    case = bench.Case("ours", "posvar_llama", "causal", "eager", "rope")
    shape = bench.BenchShape(32, 2, 4, 64, 97, 2)
    short, long = (bench.peak_memory_mib(case, shape, n, "train", "cpu") for n in (32, 1024))
    assert 0 < short < long


def test_mpt_reference_rejects_a_width_it_cannot_build():
    with pytest.raises(ValueError, match="intermediate_size=100"):
        bench.REFERENCE_BUILDERS["MptForCausalLM"](bench.BenchShape(hidden_size=32, intermediate_size=100), 16)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_position_path_case_sets_pair_every_score_bias_with_rope():
    """The long-context and bias-training case sets are chosen from the registry: every selectable encoding of
    kind "bias", on flex (long context) or SDPA (training), against the rotary encoding on SDPA."""
    from hf_posvariants.evaluation.bench import CASE_SETS, score_bias_encodings

    biases = score_bias_encodings(None)
    assert {"alibi", "t5_bias"} <= set(biases)
    for name, backend in (("long_context", "flex_attention"), ("bias_training", "sdpa")):
        chosen = CASE_SETS[name]()
        numerators = {spec.numerator for spec in chosen.ratios}
        assert {case.position_encoding for case in numerators} == set(biases)
        assert {case.backend for case in numerators} == {backend}
        assert {(spec.denominator.position_encoding, spec.denominator.backend) for spec in chosen.ratios} == {("rope", "sdpa")}
        assert {spec.metric for spec in chosen.ratios} == {"time", "memory"}


def test_training_targets_case_set_pins_each_ratio_to_its_length():
    chosen = bench.CASE_SETS["training_targets"]()
    by_name = {spec.name: spec for spec in chosen.ratios}
    assert {"t5_bias / rope training step", "fire / t5_bias training step", "alibi / rope training step",
            "ours / DebertaV2ForMaskedLM training step", "posvar_diff / posvar_llama training step"} <= set(by_name)
    assert {spec.length for spec in chosen.ratios} == {256, 1024, 2048} == set(chosen.pinned_lengths())
    assert by_name["ours / DebertaV2ForMaskedLM training step"].denominator.model_type == "DebertaV2ForMaskedLM"
    v3 = by_name["ours / DebertaV2ForMaskedLM training step, v3's relative table"]
    for case in (v3.numerator, v3.denominator):  # both sides on DeBERTa-v3's table: 256 buckets over 512 positions
        assert {("position_buckets", 256), ("max_relative_positions", 512)} <= set(case.overrides)
    assert {case.model_type for case in chosen.cases_at(256)} == {"posvar_deberta", "DebertaV2ForMaskedLM"}
    assert {case.position_encoding for case in chosen.cases_at(2048)} == {"rope", "t5_bias", "fire", "alibi"}
    assert {spec.metric for spec in chosen.ratios} == {"time", "memory"}
    assert chosen.tasks == ("train",)


def test_reference_cases_take_config_overrides_and_refuse_unknown_fields():
    shape = bench.BenchShape(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             vocab_size=64)
    reference = bench.reference_case("DebertaV2ForMaskedLM", "masked", "sdpa")
    table = dataclasses.replace(reference, overrides=(("position_buckets", 8), ("max_relative_positions", 16)))
    config = build_model(table, shape, 32, "cpu").config
    assert (config.position_buckets, config.max_relative_positions) == (8, 16)
    with pytest.raises(ValueError, match="no config field 'position_bucket'"):
        build_model(dataclasses.replace(reference, overrides=(("position_bucket", 8),)), shape, 32, "cpu")


@pytest.mark.slow
def test_training_targets_run_each_case_at_its_own_length_only(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = script("bench").main(["--quick", "--case-set", "training_targets", "--encodings", "alibi",
                                       "--threads", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    measured = {(t["case"]["model_type"], t["length"]) for t in result["timings"]}
    assert ("posvar_deberta", 256) in measured and ("posvar_deberta", 2048) not in measured
    assert ("posvar_diff", 1024) in measured and ("posvar_diff", 256) not in measured
    assert {t["task"] for t in result["timings"]} == {"train"}
    assert {r["length"] for r in result["ratios"] if r["name"].startswith("alibi /")} == {2048}
    assert all(r["value"] > 0 for r in result["ratios"] if r["value"] is not None)


def test_gpu_suite_dry_run_measures_every_row_each_case_in_its_own_process(tmp_path):
    """The GPU rows, tiny on the CPU: every case runs in its own process and reports, except what the CPU cannot
    do (flex attention has no backward there), and the ratio table names every group of the GPU baseline. The
    precompile process ran the first step of every case that compiles, and it and every case's process used the
    suite's compile cache."""
    result = script("bench").main(["--case-set", "gpu", "--dry-run", "--out-dir", str(tmp_path)])
    cache = str((tmp_path / "compile_cache").resolve())
    for timing in result["timings"]:
        assert bool(timing["precompile"]) == timing["compiles"], timing["label"]
        if timing["precompile"] and not timing["precompile"].get("error"):
            assert timing["precompile"]["compile_cache"]["dir"] == cache
            precompiled = timing["precompile"]["started_s"] + timing["precompile"]["seconds"]
            assert timing["started_s"] >= precompiled, timing["label"]  # it waited for its compile
        if timing["error"] is None:
            assert timing["compile_cache"]["dir"] == cache
            assert timing["compile_cache"]["triton_dir"] == str(Path(cache) / "triton")
            assert timing["process_s"] >= timing["phases"]["build"] + timing["phases"]["first step"] > 0
    compiled = [t for t in result["timings"] if t["case"].get("compiled")]
    assert {t["case"]["model_type"] for t in compiled} == {"LlamaForCausalLM", "posvar_llama"}
    assert all(t["error"] is None and t["compile_s"] is not None and not t["precompile"].get("error")
               for t in compiled)
    assert result["time_spent"]["precompile_s"] > 0 and result["time_spent"]["not_measured_budget"] == 0
    cpu_limit = "FlexAttention does not support backward on CPU"
    for timing in result["timings"]:
        needs_flex_backward = timing["case"]["backend"] == "flex_attention" and timing["task"] in ("train", "kernel")
        if needs_flex_backward:
            assert cpu_limit in timing["error"], timing["label"]
        else:
            assert timing["error"] is None and timing["median_ms"] > 0, (timing["label"], timing["error"])
            assert timing["peak_memory_mib"] is not None
    trained = [t for t in result["timings"] if t["task"] == "train" and t["error"] is None]
    assert trained and all(t["flops_per_step"] > 0 for t in trained)
    assert all(t["per_token_ms"] > 0 for t in result["timings"] if t["task"] == "generate")
    names = " | ".join(r["name"] for r in result["ratios"])
    for row in ("/ Llama, training (SDPA)", "Llama eager / SDPA", "alibi / rope", "t5_bias / rope",
                "on flex / rope on SDPA, training", "forward at 64", "forward at 128", "/ DebertaV2", "/ BERT SDPA",
                "/ DiffLlama", "Llama compiled / not", "posvar_llama rope compiled / not", "generate per token",
                "kernel: flex, T5 bucket table"):
        assert row in names, row
    measured = [r for r in result["ratios"] if not r["numerator_error"] and not r["denominator_error"]]
    assert measured and all(r["time"] > 0 for r in measured)
    report = (tmp_path / "bench.md").read_text()
    assert "| ratio | time | peak memory | MFU |" in report and cpu_limit in report
    assert "## Where the time went" in report and "| compile s (first step − step) | precompile s from start s |" in report


def test_gpu_suite_points_take_turns_by_group_each_denominator_first():
    """A spent budget must leave every row group measured: the first ratio of every group comes before the
    second of any."""
    from hf_posvariants.evaluation.bench.gpu import ROW_GROUPS, TINY_SIZES, gpu_suite

    points, ratios = gpu_suite(TINY_SIZES)
    firsts = [gpu_suite(TINY_SIZES, (group,))[1][0] for group in ROW_GROUPS]
    seconds = [r for r in ratios if r not in firsts]
    last_first = max(points.index(p) for r in firsts for p in (r.numerator, r.denominator))
    assert last_first < len(set(p for r in firsts for p in (r.numerator, r.denominator)))
    assert all(points.index(r.denominator) < points.index(r.numerator) for r in firsts)
    assert any(points.index(r.numerator) > last_first for r in seconds)
    assert len(points) == len(set(points)) == len({p for r in ratios for p in (r.numerator, r.denominator)})


def test_gpu_suite_rows_pick_groups_and_keep_their_denominators():
    """`--rows` measures chosen groups; a ratio's denominator from another group is measured with it."""
    from hf_posvariants.evaluation.bench.gpu import ROW_GROUPS, TINY_SIZES, gpu_suite

    every, _ = gpu_suite(TINY_SIZES)
    points, ratios = gpu_suite(TINY_SIZES, ("flex_training",))
    assert {p.case.backend for p in points} == {"flex_attention", "sdpa"} and len(ratios) == 3
    assert set(points) < set(every) and all({r.numerator, r.denominator} <= set(points) for r in ratios)
    assert sum(len(gpu_suite(TINY_SIZES, (group,))[1]) for group in ROW_GROUPS) == len(gpu_suite(TINY_SIZES)[1])
    with pytest.raises(ValueError, match="allowed values are"):
        gpu_suite(TINY_SIZES, ("decoders",))


def test_device_check_passes_on_the_cpu_and_names_a_failing_check(monkeypatch):
    """scripts/device_check.py: every check of a case runs and passes on the CPU; a wrong kernel becomes a failure
    naming the case and the check, and the run goes on to the next case."""
    from hf_posvariants.evaluation import device_check

    cases = [case for case in device_check.check_cases(["t5_bias"], flex_encodings=("t5_bias",))
             if case.config_class.model_type == "posvar_llama"]
    assert [case.label for case in cases] == ["posvar_llama/t5_bias/clm", "posvar_llama/t5_bias/mlm"]
    assert cases[0].flex and not cases[1].flex
    cases[0].flex = False  # flex compiles for seconds on the CPU; its comparison is tested in test_contract
    result = device_check.run_case(cases[0], "cpu")
    assert not result.failures and [check.split()[0] for check in result.checks] == ["sdpa", "generate", "bf16"]
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: original(*args, **kwargs) * 1.5)
    broken = device_check.run_case(cases[1], "cpu")
    assert broken.failures and broken.failures[0].startswith("sdpa: max |Δ logits|")
    with pytest.raises(ValueError, match="allowed values are"):
        device_check.check_cases(["t5"])


def send_signal_on_start(signals: dict[str, signal.Signals]) -> Callable[[str], None]:
    """A log for `run_points` that sends the first process to start whose label starts with a key of `signals`
    ("precompile" for a precompile process) that key's signal: a real crash or hang of that process."""
    signals = dict(signals)

    def log(message: str) -> None:
        started = re.match(r"started (.*) \(pid (\d+)\)$", message)
        for label in [label for label in signals if started and started.group(1).startswith(label)]:
            os.kill(int(started.group(2)), signals.pop(label))

    return log


def test_a_failing_crashing_or_hanging_case_becomes_a_row_and_the_next_still_runs():
    """A case that raises, one whose process dies of a signal, one past its timeout, one of two precompile
    processes that dies, a precompile past its case's timeout: each is reported, and the cases after them are
    measured (the other precompile done)."""
    shape = bench.BenchShape(32, 2, 4, 64, 97, 2)
    rope = bench.Case("ours", "posvar_llama", "causal", "sdpa", "rope")
    unknown = bench.Point(bench.Case("ours", "posvar_nothing", "causal", "sdpa"), shape, 16, "train")
    crashing = bench.Point(rope, shape, 16, "forward")
    hanging = bench.Point(rope, shape, 16, "train", timeout_s=0.01)
    compiled = [bench.Point(dataclasses.replace(rope, position_encoding=encoding, compiled=True), shape, 16, "train")
                for encoding in ("rope", "alibi")]
    fine = bench.Point(bench.Case("ours", "posvar_llama", "causal", "eager", "rope"), shape, 16, "train")
    slow_compile = dataclasses.replace(compiled[0], task="forward", timeout_s=0.001)
    log = send_signal_on_start({crashing.label: signal.SIGSEGV, "precompile": signal.SIGKILL})
    timings, spent = bench.run_points([unknown, crashing, hanging, *compiled, fine, slow_compile], "cpu", amp=False,
                                      warmup=0, rounds=1, compile=False, log=log, precompile_jobs=2)
    assert "posvar_nothing" in timings[0].error
    assert timings[1].error == "process died: signal SIGSEGV"
    assert timings[2].error.startswith("timed out after")
    assert timings[3].precompile["error"] == "process died: signal SIGKILL"
    assert "error" not in timings[4].precompile and timings[4].precompile["seconds"] > 0
    assert all(timing.error is None and timing.median_ms > 0 for timing in timings[3:6])
    assert timings[6].precompile["error"] == "timed out" and timings[6].error.startswith("not run: its precompile")
    assert timings[6].process_s is None and spent["not_measured_budget"] == 0
    with pytest.raises(ValueError, match="precompile_jobs=-1"):
        bench.run_points([fine], "cpu", amp=False, warmup=0, rounds=1, precompile_jobs=-1)


@pytest.mark.slow
def test_a_compiled_case_loads_what_the_precompile_process_compiled(tmp_path):
    """Compiled for real (inductor's CPU code): a precompile process compiles the step's graphs into the suite's
    cache, and the case's own process finds every graph there instead of compiling it."""
    shape = bench.BenchShape(32, 2, 4, 64, 97, 2)
    compiled = bench.Point(bench.Case("ours", "posvar_llama", "causal", "sdpa", "rope", compiled=True), shape, 16,
                           "train", timeout_s=600)
    (timing,), spent = bench.run_points([compiled], "cpu", amp=False, warmup=1, rounds=2, compile=True,
                                        log=lambda message: None, compile_cache=tmp_path)
    assert timing.error is None and not timing.precompile.get("error")
    assert timing.precompile["compile_cache"]["fx_graph_misses"] > 0
    assert timing.compile_cache["dir"] == str(tmp_path.resolve())
    assert timing.compile_cache["fx_graph_hits"] > 0 and timing.compile_cache["fx_graph_misses"] == 0
    assert timing.compile_cache["autograd_hits"] > 0
    assert timing.compile_s() < timing.precompile["seconds"]


def test_a_spent_budget_stops_the_case_running_and_reports_it_and_the_rest_as_not_measured():
    """A case that would not finish (its process stopped by SIGSTOP) is stopped at the suite's deadline; it and
    the cases not started appear in the ratio table as not measured for the budget, and the suite returns."""
    from hf_posvariants.evaluation.bench.gpu import TINY_SIZES, gpu_suite, run_gpu_suite
    from hf_posvariants.evaluation.bench.report import suite_ratio_table, suite_time_summary

    points, _ = gpu_suite(TINY_SIZES, ("generate",))
    result = run_gpu_suite("cpu", TINY_SIZES, amp=False, warmup=0, rounds=1, compile=False, budget_s=1.5,
                           log=send_signal_on_start({points[0].label: signal.SIGSTOP}), groups=("generate",))
    errors = [timing["error"] for timing in result["timings"]]
    assert errors[0].startswith("not measured: budget (stopped after")
    assert errors[1:] == ["not measured: budget (not started)"] * (len(points) - 1)
    assert result["time_spent"]["not_measured_budget"] == len(points) and 1.5 <= result["seconds"] < 30
    table = suite_ratio_table(result)
    assert all("not measured: budget" in line for line in table.splitlines()[2:])
    assert f"{len(points)} points not measured for the budget" in suite_time_summary(result)


def test_points_refuse_a_task_that_does_not_fit_their_case():
    shape = bench.BenchShape(32, 2, 4, 64, 97, 2)
    with pytest.raises(ValueError, match="task='kernel'.*allowed values are"):
        bench.Point(bench.Case("ours", "posvar_llama", "causal", "sdpa"), shape, 16, "kernel")
    with pytest.raises(ValueError, match="new_tokens=0"):
        bench.Point(bench.Case("ours", "posvar_llama", "causal", "sdpa"), shape, 16, "generate")
    with pytest.raises(ValueError, match="bias='alibi'.*flex_attention"):
        bench.KernelCase("sdpa", "alibi")


@pytest.mark.parametrize("bias", ["none", "alibi", "t5_buckets", "t5_distances", "c2p_p2c"])
def test_flex_kernel_score_functions_match_the_masked_kernel(bias):
    """Forward only (flex has no backward on CPU), uncompiled: each flex score function adds the bias its
    mask form adds; the T5, ALiBi and DeBERTa forms against the same scores built densely."""
    from hf_posvariants.evaluation.bench import measurement

    torch.manual_seed(0)
    batch, heads, length, dim = 2, 2, 16, 8
    query, key, value = (torch.randn(batch, heads, length, dim) for _ in range(3))
    tensors = []

    def tensor(*shape, grad=True):
        tensors.append(torch.randn(*shape))
        return tensors[-1]

    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        flex = measurement.flex_kernel(bench.KernelCase("flex_attention", bias), batch, heads, length, "cpu", tensor)
        output = flex(query, key, value)
    position = torch.arange(length)
    distance = (position[:, None] - position[None, :]).float()
    scores = query @ key.transpose(-1, -2) / dim**0.5
    if bias == "alibi":
        slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])
        scores = scores - slopes[:, None, None] * distance
    elif bias == "t5_buckets":
        scores = scores + tensors[0][distance.long().clamp(0, 31)].permute(2, 0, 1)
    elif bias == "t5_distances":
        scores = scores + tensors[0][:, (distance + length - 1).long()]
    elif bias == "c2p_p2c":
        index = measurement.relative_index(length, "cpu")
        c2p, p2c = tensors
        scores = scores + c2p.gather(3, index.expand(batch, heads, length, length)) \
            + p2c.gather(3, index.expand(batch, heads, length, length)).transpose(-1, -2)
    if bias != "c2p_p2c":
        scores = scores.masked_fill(distance < 0, float("-inf"))
    expected = scores.softmax(-1) @ value
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)
