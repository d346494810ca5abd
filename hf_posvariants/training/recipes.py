"""YAML recipes: one file per size/objective, overridden on the command line.

A recipe has a `model:` section whose keys are exactly the fields of the family's config (passed
straight to it, no renaming) and flat keys for the `HfArgumentParser` dataclasses (model, data and
`TrainingArguments`). On the command line, `--key value` overrides a flat key and
`--model.field value` a config field; values are read as YAML, so `--model.hidden_size 64` is an int.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml
from transformers import HfArgumentParser
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

MODEL_SECTION = "model"


def _as_argv(values: dict) -> list[str]:
    """Flat recipe keys as `--key value` tokens, so the command line after them wins (argparse keeps the last)."""
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *(str(item) for item in value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def recipe_argv(recipe: dict) -> list[str]:
    """A recipe (or overrides) given as a dict, as command-line tokens: flat keys as `--key value`, the
    `model:` section and `model.field` keys as `--model.field value` (JSON, which reads back as YAML)."""
    fields = dict(recipe.get(MODEL_SECTION) or {})
    flat = {}
    for key, value in recipe.items():
        if key.startswith(f"{MODEL_SECTION}."):
            fields[key[len(MODEL_SECTION) + 1 :]] = value
        elif key != MODEL_SECTION:
            flat[key] = value
    return _as_argv(flat) + [token for name, value in fields.items() for token in (f"--{MODEL_SECTION}.{name}", json.dumps(value))]


def _split_model_overrides(argv: list[str]) -> tuple[dict, list[str]]:
    """Pull `--model.field value` (or `--model.field=value`) out of the command line."""
    overrides, rest = {}, []
    tokens = iter(argv)
    for token in tokens:
        if token.startswith(f"--{MODEL_SECTION}."):
            name, _, value = token[len(MODEL_SECTION) + 3 :].partition("=")
            if not _:
                value = next(tokens, None)
                if value is None:
                    raise ValueError(f"--{MODEL_SECTION}.{name} needs a value.")
            overrides[name] = yaml.safe_load(value)
        else:
            rest.append(token)
    return overrides, rest


def parse_recipe(parser: HfArgumentParser, argv: list[str]) -> tuple[tuple, dict]:
    """(dataclass instances, config fields) from `[recipe.yaml] [--key value ...] [--model.field value ...]`."""
    recipe: dict = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        path = Path(argv[0])
        if not path.is_file():
            raise ValueError(f"recipe {str(path)!r} does not exist.")
        recipe = yaml.safe_load(path.read_text()) or {}
        argv = argv[1:]
    model_fields = dict(recipe.pop(MODEL_SECTION, None) or {})
    overrides, argv = _split_model_overrides(argv)
    model_fields.update(overrides)
    known = {field.name for dataclass_type in parser.dataclass_types for field in dataclasses.fields(dataclass_type)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(
            f"recipe keys {unknown} are not arguments of the training script; model fields go under "
            f"'{MODEL_SECTION}:'. Allowed keys are {sorted(known)}."
        )
    return parser.parse_args_into_dataclasses(args=_as_argv(recipe) + argv), model_fields


def config_class_of(model_type: str) -> type:
    """The config class registered with transformers' AutoConfig under `model_type`: the one lookup."""
    if model_type not in CONFIG_MAPPING:
        posvar_types = sorted(t for t in CONFIG_MAPPING if t.startswith("posvar"))
        raise ValueError(f"model_type={model_type!r} is not a registered config type; allowed values are {posvar_types}.")
    return CONFIG_MAPPING[model_type]


def check_config_fields(model_type: str, fields: dict) -> type:
    """The config class of `model_type`, after checking every recipe key is one of its fields."""
    config_class = config_class_of(model_type)
    allowed = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(
            f"recipe key(s) {unknown} under '{MODEL_SECTION}:' are not fields of {config_class.__name__}; "
            f"allowed keys are {sorted(allowed)}."
        )
    return config_class
