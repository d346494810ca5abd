"""Bad input raises a ValueError naming the field, the value and what is allowed, before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODINGS, FAMILY_CONFIGS, build, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModel, AutoModelForCausalLM

from hf_posvariants import POSITION_ENCODINGS, PosVarLlamaConfig, PosVarTransformerConfig

BOUNDED = sorted(name for name, cls in POSITION_ENCODINGS.items() if cls.bounded)
BIAS_ENCODINGS = sorted(name for name, cls in POSITION_ENCODINGS.items() if cls.kind == "bias")

INVALID_CONFIGS = {
    "unknown encoding": (dict(position_encoding="no_such_scheme"), ["position_encoding", "'no_such_scheme'", "'rope'"]),
    "heads do not divide width": (dict(hidden_size=30, num_attention_heads=4), ["num_attention_heads=4", "hidden_size=30"]),
    "kv heads do not divide heads": (dict(num_key_value_heads=3), ["num_key_value_heads=3", "num_attention_heads=4"]),
    "odd head dim for rope": (
        dict(position_encoding="rope", hidden_size=36, num_attention_heads=4, num_key_value_heads=4),
        ["head_dim=9", "even"],
    ),
    "odd rotary dim from partial factor": (
        dict(position_encoding="rope", rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.375}),
        ["partial_rotary_factor", "rotary dim 3"],
    ),
    "unknown norm": (dict(norm_type="batchnorm"), ["norm_type", "'layernorm'", "'rmsnorm'"]),
    "unknown norm position": (dict(norm_position="sandwich"), ["norm_position", "'post'", "'pre'"]),
    "unknown mlp": (dict(mlp_type="moe"), ["mlp_type", "'gated'", "'standard'"]),
    "unknown attention variant": (dict(attention_variant="linear"), ["attention_variant", "'standard'"]),
    "unknown pooling": (dict(classifier_pooling="max"), ["classifier_pooling", "'mean'"]),
    "binary code wider than the model": (
        dict(position_encoding="binary", hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
             max_position_embeddings=4096),
        ["position_encoding='binary'", "12 channels", "hidden_size=8"],
    ),
    "t5 distance inside the exact buckets": (
        dict(position_encoding="t5_bias", relative_attention_num_buckets=32, relative_attention_max_distance=10),
        ["relative_attention_max_distance=10", "16"],
    ),
    "dropout out of range": (dict(attention_dropout=1.5), ["attention_dropout=1.5"]),
}


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=[c.model_type for c in FAMILY_CONFIGS])
@pytest.mark.parametrize("case", list(INVALID_CONFIGS))
def test_invalid_config_is_refused_with_a_clear_message(config_class, case):
    overrides, fragments = INVALID_CONFIGS[case]
    overrides = dict(overrides)
    encoding = overrides.pop("position_encoding", "sinusoidal")
    with pytest.raises(ValueError) as error:
        tiny_config(config_class, encoding, **overrides)
    for fragment in fragments:
        assert fragment in str(error.value), f"{fragment!r} missing from: {error.value}"


@pytest.mark.parametrize("encoding", BIAS_ENCODINGS)
@pytest.mark.parametrize("backend", ["flash_attention_2", "flash_attention_3"])
def test_flash_is_refused_for_bias_encodings(encoding, backend):
    with pytest.raises(ValueError, match=f"attn_implementation='{backend}'.*position_encoding='{encoding}'.*'sdpa'"):
        tiny_config(PosVarLlamaConfig, encoding, attn_implementation=backend)
    config = tiny_config(PosVarLlamaConfig, encoding)
    model = build(AutoModel, config, "sdpa")
    model.config._attn_implementation = backend  # a backend switched after loading is refused at forward time
    with pytest.raises(ValueError, match="score bias"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))


@pytest.mark.parametrize("encoding", BOUNDED)
def test_bounded_table_refuses_longer_sequences(encoding):
    model = build(AutoModel, tiny_config(PosVarTransformerConfig, encoding, max_position_embeddings=16), "sdpa")
    model(input_ids=torch.ones(1, 16, dtype=torch.long))  # the whole table is fine
    with pytest.raises(ValueError, match=f"position_encoding='{encoding}'.*max_position_embeddings=16.*position 16"):
        model(input_ids=torch.ones(1, 17, dtype=torch.long))


def test_uncacheable_encoding_refuses_an_explicit_cache():
    model = build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "normalized_index"), "sdpa")
    assert model.config.use_cache is False and model.generation_config.use_cache is False
    with pytest.raises(ValueError, match="position_encoding='normalized_index'.*use_cache=False"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), use_cache=True)


def test_input_ids_and_embeds_are_exclusive():
    model = build(AutoModel, tiny_config(PosVarLlamaConfig, "rope"), "sdpa")
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), inputs_embeds=torch.zeros(1, 4, 32))


@settings(max_examples=60, deadline=None)
@given(
    hidden_size=st.integers(1, 48),
    num_attention_heads=st.integers(1, 8),
    num_key_value_heads=st.integers(1, 8),
    encoding=st.sampled_from(ENCODINGS),
    family=st.sampled_from(FAMILY_CONFIGS),
)
def test_fuzzed_shapes_either_run_or_fail_clearly(hidden_size, num_attention_heads, num_key_value_heads, encoding, family):
    """Any combination of widths either builds a model that runs or is refused by a ValueError that names a field."""
    try:
        config = tiny_config(family, encoding, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                             num_key_value_heads=num_key_value_heads, num_hidden_layers=1, intermediate_size=8,
                             max_position_embeddings=16)
    except ValueError as error:
        assert any(field in str(error) for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")), error
        return
    model = build(AutoModelForCausalLM, config, "sdpa")
    with torch.no_grad():
        logits = model(input_ids=torch.randint(3, 20, (2, 5))).logits
    assert torch.isfinite(logits).all()
