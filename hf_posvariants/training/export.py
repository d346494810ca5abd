"""Remote-code export: a checkpoint folder that loads with `trust_remote_code=True` where this package
is not installed.

`register_family` calls `register_for_auto_class`, so `save_pretrained` already copies the model's
flat source files (the modeling file and its same-folder imports) next to the weights, but it writes
only the saved head into `config.auto_map`. The export fills `auto_map` for every head of the family,
so one folder serves `AutoModel`, `AutoModelForMaskedLM`, `AutoModelForSequenceClassification`, ….
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

from .. import FAMILIES
from .run_folder import write_text_atomic

CONFIG_FILE = "config.json"


def family_auto_map(config_class: type) -> dict[str, str]:
    """`auto_map` entries ("module.Class" in the checkpoint folder) for the config and every head."""
    if config_class not in FAMILIES:
        raise ValueError(
            f"{config_class.__name__} is not a registered family; allowed configs are {[c.__name__ for c in FAMILIES]}."
        )
    entries = {AutoConfig.__name__: f"{config_class.__module__.rsplit('.', 1)[-1]}.{config_class.__name__}"}
    for auto_class, model_class in FAMILIES[config_class].items():
        entries[auto_class.__name__] = f"{model_class.__module__.rsplit('.', 1)[-1]}.{model_class.__name__}"
    return entries


def complete_auto_map(folder: str | Path, config_class: type) -> None:
    """Rewrite the folder's config.json with the family's full `auto_map`."""
    path = Path(folder) / CONFIG_FILE
    config = json.loads(path.read_text())
    config["auto_map"] = family_auto_map(config_class)
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def missing_source_files(folder: str | Path) -> list[str]:
    """Modules named in `auto_map` that the folder does not contain (an export that could not load)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    modules = {reference.split(".")[0] for reference in config.get("auto_map", {}).values()}
    return sorted(f"{module}.py" for module in modules if not (folder / f"{module}.py").is_file())


def export_for_remote_code(model, folder: str | Path, tokenizer=None) -> Path:
    """Save weights (safetensors), config with the full `auto_map`, the flat model code and the tokenizer."""
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return make_remote_loadable(folder, type(model.config))


def make_remote_loadable(folder: str | Path, config_class: type) -> Path:
    """Complete `auto_map` in a folder written by `save_pretrained` and check the code files are there."""
    complete_auto_map(folder, config_class)
    missing = missing_source_files(folder)
    if missing:
        raise RuntimeError(f"{folder} lacks the model source files {missing} named in its auto_map.")
    return Path(folder)
