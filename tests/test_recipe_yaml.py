"""Recipes and `--model.*` values read as YAML: numbers in exponent form, and a key written twice."""

from __future__ import annotations

import pytest

from hf_posvariants.training import pipeline
from hf_posvariants.training.recipes import load_yaml
from tests.test_training import ROOT


@pytest.mark.parametrize(
    "text, value",
    [("1e-6", 1e-6), ("3E5", 3e5), ("-2e+3", -2e3), ("1.5e3", 1.5e3), (".5e2", 50.0), ("1.0e-6", 1e-6),
     ("10", 10), ("0.5", 0.5), ("1e5x", "1e5x"), ('"1e-6"', "1e-6"), ("true", True)],
)  # fmt: skip
def test_numbers_read_as_yaml_12_reads_them(text, value):
    loaded = load_yaml(f"key: {text}")["key"]
    assert loaded == value and type(loaded) is type(value)


def test_exponent_numbers_reach_the_config_from_the_command_line_and_the_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "configs" / "tiny_clm.yaml").read_text().replace(
        "  attention_variant: standard", "  attention_variant: standard\n  initializer_range: 2e-2"))  # fmt: skip
    *_, fields = pipeline.parse([str(recipe), "--model.norm_eps", "1e-6", "--learning_rate", "3e-4"])
    assert fields["norm_eps"] == 1e-6 and fields["initializer_range"] == 0.02


def test_a_key_written_twice_is_an_error_naming_both_lines(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_steps: 10\nlearning_rate: 0.001\nmodel:\n  hidden_size: 64\n  hidden_size: 32\n")
    with pytest.raises(ValueError, match=r"recipe\.yaml, line 5: key .hidden_size. appears twice .*first on line 4"):
        pipeline.parse([str(recipe)])
    recipe.write_text("max_steps: 10\nmax_steps: 20\n")
    with pytest.raises(ValueError, match=r"key 'max_steps' appears twice .*first on line 1"):
        pipeline.parse([str(recipe)])
