"""Tiny configs shared by the tests: every family × every registered position encoding."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from transformers import AutoModelForCausalLM

import hf_posvariants  # noqa: F401  (registers the families with the Auto classes)
from hf_posvariants import FAMILIES
from hf_posvariants.position_encodings import selectable_position_encodings

# `torchrun` as the multi-process tests start it: `--standalone` takes a free port, so a launch never meets a port that
# an earlier launch (or another test run on the machine) still holds.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

VOCAB = 61
# The position-variant families: every encoding, causal and masked LM heads (DeBERTa has its own tests).
FAMILY_CONFIGS = [config for config, heads in FAMILIES.items() if AutoModelForCausalLM in heads]
ENCODINGS = sorted(selectable_position_encodings())


def family_with(**defaults) -> type:
    """The first registered family whose default config has these field values: tests pick a family by what
    it is (tied embeddings, post-norm, ...), not by where it sits in FAMILIES."""
    for config_class in FAMILY_CONFIGS:
        config = config_class()
        if all(getattr(config, name) == value for name, value in defaults.items()):
            return config_class
    raise LookupError(f"no registered family has the defaults {defaults}")


def tiny_config(config_class, position_encoding: str, **overrides):
    """A two-layer model small enough that a forward takes milliseconds on one CPU core."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        position_encoding=position_encoding,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if config_class.attention_variant == "disentangled":  # DeBERTa: a query head per key head, short log buckets
        fields.update(num_key_value_heads=fields["num_attention_heads"], position_buckets=8)
    fields.update(overrides)
    return config_class(**fields)


def build(model_class_or_auto, config, attn_implementation: str = "eager", seed: int = 0):
    """A model in eval mode; the config is copied because `from_config` writes the backend into it."""
    torch.manual_seed(seed)
    config = copy.deepcopy(config)
    return model_class_or_auto.from_config(config, attn_implementation=attn_implementation).eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
