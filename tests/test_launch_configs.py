"""configs/accelerate agree with the recipes and the models: what `accelerate launch` would do with them,
checked on a CPU machine (no process is started)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_multi_gpu_env
from transformers import TrainingArguments

from hf_posvariants import FAMILIES
from hf_posvariants.training.data import _data_files

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def launch_args(config: Path, *extra: str):
    """The launcher's arguments after it has read the config file, as `accelerate launch` computes them."""
    args = launch_command_parser().parse_args(["--config_file", str(config), *extra, "scripts/train.py"])
    return _validate_launch_command(args)[0]


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_leave_precision_to_the_recipe_and_never_guess_process_counts(config, monkeypatch):
    with pytest.raises(ValueError, match="num_processes"):
        launch_args(config)  # no silent 8 processes on a machine that has no 8 GPUs
    args = launch_args(config, "--num_processes", "2")
    assert args.mixed_precision == "no"
    for recipe_path in RECIPES:
        recipe = yaml.safe_load(recipe_path.read_text())
        # What TrainingArguments makes of the launcher's environment and the recipe's keys.
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", args.mixed_precision)
        bf16, fp16 = bool(recipe.get("bf16")), bool(recipe.get("fp16"))
        arguments = TrainingArguments(output_dir="unused", use_cpu=True, bf16=bf16, fp16=fp16)
        assert arguments.mixed_precision == ("bf16" if bf16 else "fp16" if fp16 else "no"), recipe_path.name


HEADS = [
    pytest.param(config_class, head, id=head.__name__)
    for config_class, heads in FAMILIES.items() for head in heads.values()
]  # fmt: skip


@pytest.mark.parametrize(("config_class", "head"), HEADS)
def test_fsdp_wrap_class_resolves_for_every_family(monkeypatch, config_class, head):
    """The launcher's FSDP environment builds accelerate's plugin; its transformer wrap policy finds the
    block class (from `_no_split_modules`) and wraps every block of the model."""
    (config,) = [c for c in ACCELERATE_CONFIGS if c.name == "fsdp.yaml"]
    environment = prepare_multi_gpu_env(launch_args(config, "--num_processes", "2"))
    for key, value in environment.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    with torch.device("meta"):  # the family's default size, without allocating it
        model = head(config_class())
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap is None
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert len(wrapped) == model.config.num_hidden_layers, wrapped
    plugin.set_auto_wrap_policy(model)  # the FSDP 1 path resolves the same classes
    resolved = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    assert {cls.__name__ for cls in resolved} == set(model._no_split_modules)


def test_data_paths_named_in_recipe_comments_exist_and_load():
    shared = ROOT.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("../shared/data is not on this machine")
    named = {path for recipe in RECIPES for path in re.findall(r"\.\./shared/data/\S+", recipe.read_text())}
    assert named
    for path in named:
        _data_files(str(ROOT / path), "train_file")  # exists, one kind of file, UTF-8 text
