"""Bad input raises a ValueError naming the field, the value and what is allowed, before any kernel runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FAMILY_CONFIGS, build, tiny_config
from transformers import AutoModel, AutoModelForCausalLM

from hf_posvariants import FAMILIES, POSITION_ENCODINGS, PosVarDebertaConfig, PosVarLlamaConfig, PosVarTransformerConfig
from hf_posvariants.components import ATTENTION_VARIANTS, selectable_position_encodings
from hf_posvariants.configuration_posvariants import PosVarConfig

def tiny_deberta_config(**overrides) -> PosVarDebertaConfig:
    fields = dict(num_key_value_heads=4, position_buckets=8)
    return tiny_config(PosVarDebertaConfig, "nope", **{**fields, **overrides})


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
    # Values that used to reach the model and turn into NaN or nonsense.
    "zero norm epsilon": (dict(norm_eps=0.0), ["norm_eps=0.0", "finite numbers > 0"]),
    "negative norm epsilon": (dict(norm_eps=-1e-5), ["norm_eps=-1e-05", "finite numbers > 0"]),
    "zero rope theta": (
        dict(position_encoding="rope", rope_parameters={"rope_type": "default", "rope_theta": 0.0}),
        ["rope_parameters['rope_theta']=0.0", "> 0"],
    ),
    "negative rope theta": (
        dict(position_encoding="rope", rope_parameters={"rope_type": "default", "rope_theta": -1e4}),
        ["rope_parameters['rope_theta']=-10000.0", "> 0"],
    ),
    "nan rope theta": (
        dict(position_encoding="rope", rope_parameters={"rope_type": "default", "rope_theta": float("nan")}),
        ["rope_parameters['rope_theta']=nan", "finite"],
    ),
    "zero rope factor": (
        dict(position_encoding="rope", rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 0.0}),
        ["rope_parameters['factor']=0.0", ">= 1"],
    ),
    "infinite lambda std": (dict(differential_lambda_std=float("inf")), ["differential_lambda_std=inf", ">= 0"]),
    "nan lambda std": (dict(differential_lambda_std=float("nan")), ["differential_lambda_std=nan", ">= 0"]),
    "negative initializer range": (dict(initializer_range=-0.02), ["initializer_range=-0.02", ">= 0"]),
    "nan initializer range": (dict(initializer_range=float("nan")), ["initializer_range=nan", "finite"]),
    # Values that used to crash deep inside torch.
    "partial rotary factor above one": (
        dict(position_encoding="rope",
             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}),
        ["rope_parameters['partial_rotary_factor']=1.5", "in (0, 1]"],
    ),
    "zero partial rotary factor": (
        dict(position_encoding="rope",
             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.0}),
        ["rope_parameters['partial_rotary_factor']=0.0", "in (0, 1]"],
    ),
    "rope parameters as a string": (
        dict(position_encoding="rope", rope_parameters="rope"),
        ["rope_parameters='rope'", "type str", "RopeParameters | dict | None"],
    ),
    "unknown rope type": (
        dict(position_encoding="rope", rope_parameters={"rope_type": "xpos", "rope_theta": 1e4}),
        ["rope_parameters['rope_type']='xpos'", "'llama3'", "'yarn'"],
    ),
    "rope scaling without its factor": (
        dict(position_encoding="rope", rope_parameters={"rope_type": "linear", "rope_theta": 1e4}),
        ["rope_parameters=", "'factor'"],
    ),
    "llama3 frequency band of width zero": (
        dict(position_encoding="rope", rope_parameters={
            "rope_type": "llama3", "rope_theta": 1e4, "factor": 2.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0,
            "original_max_position_embeddings": 32}),
        ["rope_parameters['high_freq_factor']=2.0", "low_freq_factor']=2.0"],
    ),
    "zero head dim": (dict(head_dim=0), ["head_dim=0", "integers >= 1"]),
    "negative head dim": (dict(head_dim=-8), ["head_dim=-8", "integers >= 1"]),
    "pad token beyond the vocabulary": (dict(pad_token_id=61), ["pad_token_id=61", "0..60", "vocab_size=61"]),
    "negative pad token": (dict(pad_token_id=-1), ["pad_token_id=-1", "0..60"]),
    "unknown activation": (dict(hidden_act="swoosh"), ["hidden_act='swoosh'", "'gelu'", "'silu'"]),
    "width as a string": (dict(hidden_size="64"), ["hidden_size='64'", "type str", "allowed types are int"]),
    "head count as a float": (dict(num_attention_heads=2.0), ["num_attention_heads=2.0", "type float", "int"]),
    "layer count as a bool": (dict(num_hidden_layers=True), ["num_hidden_layers=True", "type bool", "int"]),
    "is_decoder as a string": (dict(is_decoder="yes"), ["is_decoder='yes'", "type str", "allowed types are bool"]),
    "epsilon as a string": (dict(norm_eps="1e-5"), ["norm_eps='1e-5'", "type str", "float"]),
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


INVALID_DEBERTA_CONFIGS = {
    "position terms as an int": (dict(pos_att_type=5), ["pos_att_type=5", "type int", "str | list[str]"]),
    "zero norm epsilon": (dict(norm_eps=0.0), ["norm_eps=0.0", "> 0"]),
    "bucket count as a float": (dict(position_buckets=64.0), ["position_buckets=64.0", "type float", "int"]),
    "unknown activation": (dict(hidden_act="swoosh"), ["hidden_act='swoosh'", "'gelu'"]),
    # The fields the disentangled variant and the deberta_relative encoding own, refused by them.
    "unknown position term": (dict(pos_att_type=["c2p", "p2p"]), ["pos_att_type=['p2p']", "['c2p', 'p2c']"]),
    "unknown relative norm": (dict(norm_rel_ebd="rms"), ["norm_rel_ebd='rms'", "['layer_norm', 'none']"]),
    "one bucket": (dict(position_buckets=1), ["position_buckets=1", "-1 (no buckets)", ">= 2"]),
    "zero clipping distance": (dict(max_relative_positions=0), ["max_relative_positions=0", ">= 1", "-1"]),
}


@pytest.mark.parametrize("case", list(INVALID_DEBERTA_CONFIGS))
def test_invalid_deberta_config_is_refused_with_a_clear_message(case):
    overrides, fragments = INVALID_DEBERTA_CONFIGS[case]
    with pytest.raises(ValueError) as error:
        tiny_deberta_config(**overrides)
    for fragment in fragments:
        assert fragment in str(error.value), f"{fragment!r} missing from: {error.value}"


def test_relative_table_fields_are_checked_while_the_table_is_used():
    """Like an encoding not in use, the deberta_relative table's fields are not read without relative attention."""
    unused = dict(relative_attention=False, position_buckets=1, norm_rel_ebd="rms")
    assert tiny_deberta_config(**unused).position_buckets == 1
    with pytest.raises(ValueError, match="norm_rel_ebd='rms'"):
        tiny_deberta_config(**{**unused, "relative_attention": True})


def test_disentangled_attention_outside_its_family_names_the_missing_fields():
    with pytest.raises(ValueError, match=r"'disentangled' needs .*'pos_att_type'.*'position_buckets'"):
        tiny_config(PosVarLlamaConfig, "nope", attention_variant="disentangled", num_key_value_heads=4)


def test_numbers_of_the_other_type_are_accepted_where_exact():
    """An int is a valid float (JSON writes 1e-5 but a user may write 1); the stored value is unchanged."""
    config = tiny_config(PosVarLlamaConfig, "rope", norm_eps=1, initializer_range=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000})
    assert config.norm_eps == 1 and config.rope_parameters["rope_theta"] == 10000


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=[c.model_type for c in FAMILY_CONFIGS])
def test_a_config_edited_after_building_is_refused_when_saved(config_class, tmp_path):
    config = tiny_config(config_class, "rope")
    config.norm_eps = -1.0
    with pytest.raises(ValueError, match=r"norm_eps=-1.0 is not allowed"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_attention_maps_on_a_backend_without_them_are_a_plain_value_error():
    with pytest.raises(ValueError, match=r"output_attentions.*sdpa.*'eager'"):
        tiny_config(PosVarLlamaConfig, "rope", output_attentions=True, attn_implementation="sdpa")


EMPTY_SHAPES = [(1, 0), (0, 4)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=["no tokens", "no sequences"])
@pytest.mark.parametrize(
    "config_class,auto_class",
    [(config_class, auto_class) for config_class, heads in FAMILIES.items() for auto_class in heads],
    ids=lambda item: getattr(item, "model_type", getattr(item, "__name__", None)),
)
def test_empty_input_is_one_clear_error(config_class, auto_class, shape):
    config = tiny_deberta_config() if config_class is PosVarDebertaConfig else tiny_config(config_class, "sinusoidal")
    model = build(auto_class, config, "sdpa")
    with pytest.raises(ValueError, match=rf"input_ids has shape \({shape[0]}, {shape[1]}\); allowed shapes"):
        model(input_ids=torch.ones(shape, dtype=torch.long), attention_mask=torch.ones(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"inputs_embeds has shape \({shape[0]}, {shape[1]}, 32\)"):
        model(inputs_embeds=torch.zeros(*shape, 32))


def test_index_encoding_refuses_float16_beyond_its_largest_finite_position():
    """float16 ends at 65504: a table reaching past it would add inf to the embeddings. (The scores computed
    from such embeddings overflow float16 far earlier, depending on the weights; the docstring says so.)"""
    embeddings, position = torch.zeros(1, 1, 32, dtype=torch.float16), torch.tensor([[65504]])
    fits = POSITION_ENCODINGS["index"](tiny_config(PosVarTransformerConfig, "index", max_position_embeddings=65505), False)
    assert fits.add_to_embeddings(embeddings, position).eq(65504).all()
    too_long = POSITION_ENCODINGS["index"](tiny_config(PosVarTransformerConfig, "index", max_position_embeddings=65506), False)
    assert too_long.add_to_embeddings(embeddings.float(), position + 1).eq(65505).all()  # float32 holds it
    with pytest.raises(ValueError, match=r"position_encoding='index' with max_position_embeddings=65506.*float16"):
        too_long.add_to_embeddings(embeddings, position)


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


def declaring_class(field: str) -> type | None:
    """The most basic posvariants config class that declares `field` in its own annotations (a family re-declares
    PosVarConfig's fields only to change a default)."""
    classes = {
        klass for config_class in FAMILIES for klass in config_class.__mro__
        if issubclass(klass, PosVarConfig) and field in vars(klass).get("__annotations__", {})
    }
    return min(classes, key=lambda klass: len(klass.__mro__), default=None)


def test_components_own_declared_and_documented_fields():
    """Each encoding's and attention variant's own fields are config fields, owned by one component, and named in
    the docstring of the config class that declares them; PosVarConfig's also lists every selectable encoding."""
    owned = [name for cls in [*POSITION_ENCODINGS.values(), *ATTENTION_VARIANTS.values()] for name in cls.config_fields]
    assert owned and len(owned) == len(set(owned))
    for name in owned:
        declared_by = declaring_class(name)
        assert declared_by is not None, f"{name} is no field of any family's config"
        assert name in declared_by.__doc__, f"{name} is not documented in {declared_by.__name__}"
    assert all(f'"{name}"' in PosVarConfig.__doc__ for name in selectable_position_encodings())


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=[c.model_type for c in FAMILY_CONFIGS])
def test_a_family_adds_no_field_that_no_component_owns(config_class):
    """The fields a family's config adds to PosVarConfig are its components' (validated by them), except the
    Enhanced Mask Decoder's depth, which DeBERTa's masked-LM head reads."""
    base = {field.name for field in dataclasses.fields(PosVarConfig)}
    added = {field.name for field in dataclasses.fields(config_class)} - base
    owned = {name for cls in [*POSITION_ENCODINGS.values(), *ATTENTION_VARIANTS.values()] for name in cls.config_fields}
    assert added - owned <= {"emd_layers"}, added - owned
