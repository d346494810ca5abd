"""The training pipeline end to end on tiny models: recipes, data, tokenizers, checkpoints, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from hf_posvariants.training import pipeline
from hf_posvariants.training.data import builtin_texts, content_hash
from tests.conftest import FAMILY_CONFIGS, TORCHRUN

ROOT = Path(__file__).resolve().parents[1]
# Families with both LM heads and every encoding; DeBERTa's Trainer run is in tests/test_deberta.py.
FAMILY_TYPES = [config_class.model_type for config_class in FAMILY_CONFIGS]
HEADS = {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine were 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_argv(output_dir: Path, objective: str = "clm", model_type: str = "posvar_llama", *extra: str) -> list[str]:
    """The tiny recipe of `objective`, shrunk to a run of a few seconds."""
    return [
        str(ROOT / "configs" / f"tiny_{objective}.yaml"),
        "--model_type", model_type,
        "--output_dir", str(output_dir),
        "--builtin_examples", "300",
        "--block_size", "32",
        "--max_steps", "30",
        "--per_device_train_batch_size", "8",
        "--learning_rate", "0.003",
        "--warmup_steps", "0",
        "--logging_steps", "5",
        "--eval_steps", "30",
        "--save_steps", "30",
        "--disable_tqdm", "true",
        "--model.hidden_size", "32",
        "--model.intermediate_size", "48",
        "--model.max_position_embeddings", "64",
        *extra,
    ]  # fmt: skip


def train_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_builtin_data_is_deterministic_and_varied():
    texts = builtin_texts(40, seed=3)
    assert texts == builtin_texts(40, seed=3)
    assert texts != builtin_texts(40, seed=4)
    assert {text.split()[0] for text in texts} == {"copy", "reverse", "recall", "count"}
    copy_line = next(t for t in texts if t.startswith("copy"))
    source, target = copy_line.removeprefix("copy : ").split(" = ")
    assert source == target
    reverse_line = next(t for t in texts if t.startswith("reverse"))
    source, target = reverse_line.removeprefix("reverse : ").split(" = ")
    assert source.split()[::-1] == target.split()


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_tiny_run_learns_and_reloads(tmp_path, model_type, objective):
    metrics = pipeline.main(tiny_argv(tmp_path, objective, model_type))
    losses = train_losses(tmp_path)
    assert losses[-1] < 0.95 * losses[0], losses
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-4) or (
        objective == "mlm"  # masked batches hold different numbers of masked tokens: per-token ≠ per-batch mean
    )
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "training_args.bin").is_file()
    assert json.loads((tmp_path / "all_results.json").read_text())["eval_loss"] == metrics["eval_loss"]

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = tokenizer(builtin_texts(2, seed=99), return_tensors="pt", padding=True)
    model = HEADS[objective].from_pretrained(tmp_path).eval()
    assert AutoConfig.from_pretrained(tmp_path).model_type == model_type
    weights = load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    rebuilt = HEADS[objective].from_config(model.config)
    rebuilt.load_state_dict(weights, strict=False)
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, rebuilt(**batch).logits, rtol=0, atol=0)


# Each rank of `torchrun --nproc_per_node 2` records its world size, final eval loss and weights checksum.
DDP_RUN = """
import json, os, sys
import torch
from transformers import TrainerCallback
from hf_posvariants.training import pipeline

class Record(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.checksum = float(sum(p.detach().double().sum() for p in model.parameters()))

record = Record()
metrics = pipeline.main(json.loads(sys.argv[1]), callbacks=[record])
rank = int(os.environ["RANK"])
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump({"world": torch.distributed.get_world_size(), "eval_loss": metrics["eval_loss"], "checksum": record.checksum}, f)
"""


# Two fresh interpreters importing transformers, then gloo: about 10 s on 2 cores.
def test_two_process_gloo_ddp_agrees_across_ranks(tmp_path):
    argv = tiny_argv(tmp_path / "run", "clm", "posvar_llama", "--max_steps", "8", "--eval_strategy", "no",
                     "--save_strategy", "no")  # fmt: skip
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DDP_RUN)
    result = subprocess.run(
        [*TORCHRUN, "--nproc_per_node", "2", str(driver), json.dumps(argv), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["eval_loss"] == ranks[1]["eval_loss"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


@pytest.mark.slow  # the README's demo command, shortened: a fresh interpreter running scripts/train.py
def test_demo_command_writes_a_loadable_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), str(ROOT / "configs" / "tiny_clm.yaml"),
         "--output_dir", str(tmp_path), "--max_steps", "20", "--eval_steps", "20", "--save_steps", "20"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert {"eval_loss", "eval_perplexity", "eval_accuracy"} <= set(results)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    prompt = tokenizer("copy : a b c =", return_tensors="pt")
    assert model.generate(**prompt, max_new_tokens=4, do_sample=False).shape[-1] == prompt["input_ids"].shape[-1] + 4


def test_finetune_from_checkpoint_on_a_folder_of_text_files(tmp_path):
    """Continue training a saved model on local text: its tokenizer is reused; JSON lines work too."""
    pipeline.main(tiny_argv(tmp_path / "base", "clm", "posvar_llama", "--max_steps", "10"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = builtin_texts(400, seed=5)
    (corpus / "a.txt").write_text("\n".join(texts[:200]) + "\n")
    (corpus / "b.txt").write_text("\n".join(texts[200:]) + "\n")
    metrics = pipeline.main(tiny_argv(tmp_path / "tuned", "clm", "posvar_llama", "--max_steps", "10",
                                      "--model_name_or_path", str(tmp_path / "base"), "--train_file", str(corpus)))  # fmt: skip
    assert metrics["train_samples"] > 0 and "eval_perplexity" in metrics
    assert (tmp_path / "tuned" / "tokenizer.json").read_text() == (tmp_path / "base" / "tokenizer.json").read_text()
    record = json.loads((tmp_path / "tuned" / "run_args.json").read_text())
    assert record["init"] == str(tmp_path / "base") and record["dataset"] == "corpus"
    assert record["dataset_sha256"] == content_hash(corpus) and record["data_args"]["train_file"] == str(corpus)

    lines = tmp_path / "lines.jsonl"
    lines.write_text("".join(json.dumps({"id": i, "body": text}) + "\n" for i, text in enumerate(texts)))
    metrics = pipeline.main(tiny_argv(tmp_path / "jsonl", "clm", "posvar_llama", "--max_steps", "5",
                                      "--train_file", str(lines), "--text_column", "body"))  # fmt: skip
    assert metrics["eval_loss"] > 0
    with pytest.raises(ValueError, match="text_column='txt'"):
        pipeline.main(tiny_argv(tmp_path / "bad", "clm", "posvar_llama", "--train_file", str(lines), "--text_column", "txt"))


def test_train_recipe_takes_a_dict_and_overrides_and_returns_folder_and_metrics(tmp_path):
    """The Python entry point (used by studies): the recipe as a dict, overrides as a dict."""
    recipe = yaml.safe_load((ROOT / "configs" / "tiny_clm.yaml").read_text())
    recipe["model"]["position_encoding"] = "alibi"
    result = pipeline.train_recipe(recipe, {
        "output_dir": str(tmp_path), "max_steps": 2, "builtin_examples": 300, "block_size": 32,
        "eval_strategy": "no", "disable_tqdm": True, "model.hidden_size": 32, "model.intermediate_size": 48,
    })  # fmt: skip
    assert result.output_dir == str(tmp_path)
    assert result.metrics == json.loads((tmp_path / "all_results.json").read_text())
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.position_encoding, config.hidden_size, config.num_hidden_layers) == ("alibi", 32, 2)


@pytest.mark.parametrize("encoding,layer_encodings,on_cuda", [
    ("t5_bias", None, "flex_attention"), ("kerple", None, "flex_attention"), ("alibi", None, "sdpa"),
    ("rope", None, "sdpa"), ("rope", ["rope", "t5_bias"], "flex_attention"),
])
def test_auto_backend_trains_a_learned_bias_on_flex_on_cuda_only(encoding, layer_encodings, on_cuda):
    """`attn_implementation: auto` follows the GPU measurements: flex for a learned score bias on CUDA (its table
    trains without a (B, H, Q, K) gradient), SDPA on the CPU and for fixed or no biases."""
    config_class = FAMILY_CONFIGS[1]
    config = config_class(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          position_encoding=encoding, layer_position_encodings=layer_encodings)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert pipeline.training_backend(model, "cpu") == "sdpa"
    assert pipeline.training_backend(model, "cuda") == on_cuda
    cope = AutoModelForCausalLM.from_config(config_class(**{**config.to_dict(), "position_encoding": "cope",
                                                            "layer_position_encodings": None}))
    assert pipeline.training_backend(cope, "cuda") == "sdpa"  # a learned bias flex cannot carry stays on SDPA


def test_auto_backend_through_train_py_on_the_cpu(tmp_path):
    recipe, *overrides = tiny_argv(tmp_path / "run", "clm", "posvar_llama", "--attn_implementation", "auto",
                                   "--model.position_encoding", "t5_bias", "--max_steps", "4")
    result = pipeline.train_recipe(recipe, overrides)
    assert AutoConfig.from_pretrained(result.output_dir).position_encoding == "t5_bias"
    assert result.metrics["train_loss"] > 0
