"""Evaluation harnesses on a trained folder: it tells them its trained length, `python -m hf_posvariants.lm_eval`
lets lm-evaluation-harness load it as `pretrained=FOLDER`, and a masked LM loaded as a causal one warns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from hf_posvariants import PosVarDiffConfig, PosVarLlamaConfig, lm_eval
from hf_posvariants.evaluation.data import byte_tokenizer
from hf_posvariants.training import pipeline
from hf_posvariants.training.hub import render_model_card
from tests.conftest import build, tiny_config
from tests.test_training import ROOT, _one_thread, tiny_argv  # noqa: F401  (autouse fixture)


def test_a_trained_folder_tells_harnesses_its_trained_length(tmp_path):
    pipeline.main(tiny_argv(tmp_path, "clm", "posvar_llama", "--max_steps", "2", "--save_steps", "2",
                            "--eval_strategy", "no", "--block_size", "24"))  # fmt: skip
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["max_position_embeddings"] == 64  # what lm-eval would take as its window without max_length
    for folder in (tmp_path, tmp_path / "checkpoint-2"):
        assert AutoTokenizer.from_pretrained(folder).model_max_length == 24, folder
    assert json.loads((tmp_path / "run_args.json").read_text())["block_size"] == 24
    card = render_model_card(tmp_path, "someone/tiny").content
    assert "lm_eval --model hf --model_args pretrained=someone/tiny,trust_remote_code=True,max_length=24" in card


def test_a_masked_lm_folder_loaded_as_a_causal_lm_warns(tmp_path):
    for config_class in (PosVarLlamaConfig, PosVarDiffConfig):
        config = tiny_config(config_class, "rope")
        build(AutoModelForMaskedLM, config).save_pretrained(tmp_path / "mlm")
        build(AutoModelForCausalLM, config).save_pretrained(tmp_path / "clm")
        with pytest.warns(UserWarning, match="trained as a masked language model"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "mlm")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            AutoModelForCausalLM.from_pretrained(tmp_path / "clm")
            AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm")


# A stand-in for lm-evaluation-harness's `python -m lm_eval --model hf --model_args pretrained=...`: its HF model
# resolves the folder as HFLM does, through AutoConfig and AutoModelForCausalLM without trust_remote_code.
FAKE_LM_EVAL = """
import sys
from transformers import AutoConfig, AutoModelForCausalLM
model_args = dict(pair.split("=") for pair in sys.argv[sys.argv.index("--model_args") + 1].split(","))
AutoConfig.from_pretrained(model_args["pretrained"], trust_remote_code=False)
model = AutoModelForCausalLM.from_pretrained(model_args["pretrained"], trust_remote_code=False)
print("scored", type(model).__name__, "at", model_args["max_length"])
"""


def test_lm_eval_through_the_package_loads_a_plain_pretrained_folder(tmp_path):
    folder = tmp_path / "model"
    build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")).save_pretrained(folder)
    (tmp_path / "fake" / "lm_eval").mkdir(parents=True)
    (tmp_path / "fake" / "lm_eval" / "__init__.py").write_text("")
    (tmp_path / "fake" / "lm_eval" / "__main__.py").write_text(textwrap.dedent(FAKE_LM_EVAL))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path / "fake")]), "HF_HUB_OFFLINE": "1"}
    arguments = ["--model", "hf", "--model_args", f"pretrained={folder},max_length=32", "--tasks", "wikitext"]

    def run(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *arguments], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    plain = run("lm_eval")
    assert plain.returncode != 0 and "trust_remote_code=True" in plain.stderr  # nothing registered the family
    (folder / "run_args.json").write_text(json.dumps({"block_size": 16}))
    through_package = run("hf_posvariants.lm_eval")
    assert through_package.returncode == 0, through_package.stderr[-3000:]
    assert "scored PosVarLlamaForCausalLM at 32" in through_package.stdout
    assert "max_length=32 scores windows of 32 tokens, beyond the 16" in through_package.stderr


@pytest.mark.parametrize("argv", [
    ["--model", "hf", "--model_args", "pretrained=F,max_length=32", "--tasks", "wikitext"],
    ["--model_args=pretrained=F,max_length=32", "--tasks", "wikitext"],
    ["run", "-a", "pretrained=F", "max_length=32", "--tasks", "wikitext"],
    ["--model_args", '{"pretrained": "F", "max_length": 32}'],
])  # fmt: skip
def test_the_model_arguments_are_read_in_every_form_the_harness_takes(argv):
    assert lm_eval.model_args(argv) == {"pretrained": "F", "max_length": "32"}


def test_scoring_beyond_the_trained_length_warns(tmp_path):
    folder = tmp_path / "model"
    build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")).save_pretrained(folder)  # 64 positions
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(folder)  # no model_max_length: no trained length known, nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lm_eval.warn_beyond_trained_length({"pretrained": str(folder)})
    tokenizer.model_max_length = 24
    tokenizer.save_pretrained(folder)
    with pytest.warns(UserWarning, match="with no max_length, .* max_position_embeddings=64 tokens, beyond the 24 "
                                         ".*Pass max_length=24"):  # fmt: skip
        lm_eval.warn_beyond_trained_length({"pretrained": str(folder)})
    (folder / "run_args.json").write_text(json.dumps({"block_size": 16}))  # the run record says first
    with pytest.warns(UserWarning, match="max_length=24 scores windows of 24 tokens, beyond the 16"):
        lm_eval.warn_beyond_trained_length({"pretrained": str(folder), "max_length": "24"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lm_eval.warn_beyond_trained_length({"pretrained": str(folder), "max_length": "16"})
        lm_eval.warn_beyond_trained_length({"pretrained": "someone/model", "max_length": "4096"})  # a Hub id
