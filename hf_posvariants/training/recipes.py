"""YAML recipes: one file per size/objective, overridden on the command line.

A recipe has a `model:` section whose keys are exactly the fields of the family's config (passed
straight to it, no renaming) and flat keys for the `HfArgumentParser` dataclasses (model, data and
`TrainingArguments`). On the command line, `--key value` overrides a flat key and
`--model.field value` a config field; values are read as YAML, so `--model.hidden_size 64` is an int.
Numbers read as YAML 1.2 reads them (`1e-6` is a float, where YAML 1.1 makes it a string), and a key
written twice in one mapping is an error rather than "the last one wins".
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml
from transformers import HfArgumentParser
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

MODEL_SECTION = "model"
# YAML 1.2 floats with an exponent but no dot or no exponent sign (`1e-6`, `3E5`, `1.5e3`), which
# YAML 1.1 reads as text; the other float forms are the same in both.
EXPONENT_FLOAT = re.compile(r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")


class RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with YAML 1.2 numbers, refusing a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges another mapping's keys
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first {seen[key]}); keep one of them",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = f"on line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep)


# Tried before SafeLoader's own resolvers, for every first character such a number can start with.
RecipeLoader.yaml_implicit_resolvers = {
    first: [("tag:yaml.org,2002:float", EXPONENT_FLOAT), *resolvers]
    if first in "-+.0123456789" else list(resolvers)
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}  # fmt: skip


def load_yaml(text: str, source: str = "<string>") -> object:
    """YAML as recipes read it (see `RecipeLoader`); a mistake in it names `source` and the line."""
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.MarkedYAMLError as error:
        where = f", line {error.problem_mark.line + 1}" if error.problem_mark is not None else ""
        raise ValueError(f"{source}{where}: {error.problem}") from None


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
            overrides[name] = load_yaml(value, f"--{MODEL_SECTION}.{name}")
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
        recipe = load_yaml(path.read_text(), str(path)) or {}
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
