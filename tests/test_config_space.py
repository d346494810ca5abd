"""Property test over the whole config space of every family: a drawn config either raises a ValueError from the
config constructor that names a field, or builds a model whose logits and gradients are finite in float32 and
bfloat16. A quarter of the draws also corrupt one value on purpose; those must always be refused.

The strategy covers sizes, head and KV-head counts, every registered encoding and attention variant, every RoPE
type with its parameters, the T5 buckets, DeBERTa's and differential attention's options, norms, MLPs,
activations, and every backend name. Flash kernels cannot run on a CPU: for them the property is that the config
refuses a score bias, and the accepted model runs on the eager kernel instead.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedConfig,
)
from transformers.activations import ACT2FN

from hf_posvariants import FAMILIES, POSITION_ENCODINGS, PosVarDebertaConfig
from hf_posvariants.attention import ATTENTION_VARIANTS
from hf_posvariants.bias_route import BIASLESS_BACKENDS
from hf_posvariants.configuration_posvariants import ROPE_TYPES

VOCAB = 31
CPU_BACKENDS = ("eager", "sdpa")
NOT_FINITE = (float("nan"), float("inf"), -float("inf"))


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in n draws. False comes first: hypothesis favours (and shrinks towards) early elements."""
    return st.sampled_from([False] * (n - 1) + [True])


@st.composite
def rope_parameters(draw, head_dim: int) -> dict:
    """A RoPE dict of any type transformers implements, with the keys that type requires."""
    rope_type = draw(st.sampled_from(ROPE_TYPES))
    rope = {"rope_type": rope_type, "rope_theta": draw(st.sampled_from([10.0, 1e4, 5e5]))}
    if draw(one_in(3)) or rope_type == "proportional":
        rope["partial_rotary_factor"] = draw(st.sampled_from([0.25, 0.5, 1.0]))
    if rope_type in ("linear", "dynamic", "yarn", "longrope", "llama3"):
        rope["factor"] = draw(st.sampled_from([1.0, 2.0, 8.0]))
    if rope_type in ("yarn", "llama3", "longrope"):
        rope["original_max_position_embeddings"] = draw(st.sampled_from([4, 8]))
    if rope_type == "yarn" and draw(st.booleans()):
        rope.update(beta_fast=draw(st.sampled_from([8.0, 32.0])), beta_slow=1.0, attention_factor=draw(st.sampled_from([0.5, 1.0])))
    if rope_type == "yarn" and draw(st.booleans()):
        rope.update(mscale=draw(st.sampled_from([0.0, 1.0])), mscale_all_dim=draw(st.sampled_from([0.0, 0.707])))
    if rope_type == "llama3":
        low = draw(st.sampled_from([1.0, 2.0]))
        rope.update(low_freq_factor=low, high_freq_factor=low + draw(st.sampled_from([1.0, 3.0])))
    if rope_type == "longrope":
        pairs = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        for key in ("short_factor", "long_factor"):
            rope[key] = draw(st.lists(st.sampled_from([1.0, 1.5, 4.0]), min_size=pairs, max_size=pairs))
    return rope


def corruptions(config: dict) -> list[tuple[str, object]]:
    """Values that must be refused for this config: (field, bad value); `rope_parameters[key]` for RoPE keys."""
    bad = [
        ("norm_eps", 0.0), ("norm_eps", -1e-6), *(("norm_eps", value) for value in NOT_FINITE),
        ("initializer_range", -0.02), ("initializer_range", float("nan")),
        ("differential_lambda_std", float("inf")), ("differential_lambda_std", float("nan")),
        ("hidden_dropout", 1.0), ("hidden_dropout", float("nan")),
        ("head_dim", 0), ("head_dim", -2),
        ("pad_token_id", VOCAB), ("pad_token_id", -1),
        ("hidden_act", "swoosh"), ("position_encoding", "no_such_scheme"), ("attention_variant", "linear"),
        ("norm_type", "batchnorm"), ("mlp_type", "moe"),
        ("hidden_size", str(config["hidden_size"])), ("num_attention_heads", float(config["num_attention_heads"])),
        ("num_hidden_layers", True), ("is_decoder", "yes"), ("use_cache", 1), ("rope_parameters", "rope"),
        ("vocab_size", 0), ("max_position_embeddings", -1),
    ]
    if config["position_encoding"] == "rope":
        bad += [
            ("rope_parameters[rope_theta]", 0.0), ("rope_parameters[rope_theta]", -1e4),
            ("rope_parameters[rope_theta]", float("nan")), ("rope_parameters[rope_type]", "xpos"),
            ("rope_parameters[partial_rotary_factor]", 0.0), ("rope_parameters[partial_rotary_factor]", 1.5),
        ]
        if "factor" in config["rope_parameters"]:
            bad += [("rope_parameters[factor]", 0.0), ("rope_parameters[factor]", float("inf"))]
        if "original_max_position_embeddings" in config["rope_parameters"]:
            bad += [("rope_parameters[original_max_position_embeddings]", 0)]
        if "short_factor" in config["rope_parameters"]:
            bad += [("rope_parameters[short_factor]", [1.0]), ("rope_parameters[long_factor]", [-1.0] * 64)]
    if config["position_encoding"] == "t5_bias":
        bad += [("relative_attention_num_buckets", 2), ("relative_attention_max_distance", 1)]
    if config["attention_variant"] == "differential":
        bad += [("differential_lambda_init", 1.0), ("differential_lambda_init", float("nan"))]
    if config["family"] is PosVarDebertaConfig:
        bad += [("pos_att_type", 5), ("pos_att_type", ["c2c"]), ("emd_layers", -1), ("position_buckets", "8")]
        if config.get("relative_attention", True):  # the relative table's fields are checked only while it is used
            bad += [("norm_rel_ebd", "rms"), ("max_relative_positions", 0), ("position_buckets", 1)]
    return bad


def wrong_types(config_class) -> list[tuple[str, object]]:
    """Every field the posvariants configs add to transformers' base config, set to a JSON object (a type only
    rope_parameters takes)."""
    base = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    names = [field.name for field in dataclasses.fields(config_class) if field.name not in base]
    return [(name, {"a": 1}) for name in sorted(names) if name != "rope_parameters"]


@st.composite
def configs(draw, backends: tuple[str, ...]) -> dict:
    """Config fields plus `family`, `head` (an Auto class), `backend` and `corrupted` (a field or None)."""
    family = draw(st.sampled_from(list(FAMILIES)))
    deberta = family is PosVarDebertaConfig
    heads = draw(st.sampled_from([1, 2, 4]))
    width_per_head = draw(st.sampled_from([2, 4, 6, 8]))
    hidden_size = draw(st.integers(4, 24)) if draw(one_in(6)) else heads * width_per_head
    encoding = draw(st.sampled_from(sorted(POSITION_ENCODINGS)))
    # Mostly values that fit together, so that most draws build a model; the rest probe the refusals.
    kv_heads = heads if deberta else draw(st.sampled_from([count for count in (1, 2, 4) if heads % count == 0]))
    config = dict(
        family=family,
        head=draw(st.sampled_from(list(FAMILIES[family]))),
        backend=draw(st.sampled_from(backends)),
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=draw(st.sampled_from([4, 16])),
        num_hidden_layers=draw(st.sampled_from([1, 2])),
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([1, 2, 4])) if draw(one_in(6)) else kv_heads,
        head_dim=draw(st.sampled_from([None, None, None, 4, 8])),
        max_position_embeddings=draw(st.sampled_from([8, 16, 64])),
        position_encoding=draw(st.sampled_from(["nope", "learned"])) if deberta and not draw(one_in(6)) else encoding,
        attention_variant=draw(st.sampled_from(sorted(ATTENTION_VARIANTS))) if heads > 1 or draw(one_in(4)) else "standard",
        relative_attention_num_buckets=draw(st.sampled_from([4, 8, 32])),
        relative_attention_max_distance=draw(st.sampled_from([8, 16, 128])),
        is_decoder=draw(st.booleans()),
        norm_type=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        norm_position=draw(st.sampled_from(["pre", "post"])),
        mlp_type=draw(st.sampled_from(["standard", "gated"])),
        hidden_act=draw(st.sampled_from(sorted(ACT2FN))),
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        scale_embeddings=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        hidden_dropout=draw(st.sampled_from([0.0, 0.1])),
        attention_dropout=0.1 if draw(one_in(6)) else 0.0,
        classifier_pooling=draw(st.sampled_from([None, "first", "last", "mean"])),
        pad_token_id=draw(st.sampled_from([None, 0])),
        differential_head_layout=draw(st.sampled_from(["pairs", "halves"])),
        differential_norm_affine=draw(st.booleans()),
        differential_lambda_init=draw(st.sampled_from([None, 0.0, 0.5])),
        differential_lambda_std=draw(st.sampled_from([0.0, 0.1])),
    )
    if deberta:
        config.update(
            attention_variant=config["attention_variant"] if draw(one_in(6)) else "disentangled",
            is_decoder=config["is_decoder"] if draw(one_in(6)) else False,
            relative_attention=draw(st.booleans()),
            pos_att_type=draw(st.sampled_from(["c2p|p2c", ["c2p"], ["p2c"], [], "p2c"])),
            position_buckets=draw(st.sampled_from([-1, 4, 8, 256])),
            max_relative_positions=draw(st.sampled_from([-1, 4, 16])),
            share_att_key=draw(st.booleans()),
            norm_rel_ebd=draw(st.sampled_from(["none", "layer_norm"])),
            emd_layers=draw(st.sampled_from([0, 1, 2])),
        )
    rope_head_dim = config["head_dim"] or max(hidden_size // heads, 1)
    config["rope_parameters"] = draw(rope_parameters(rope_head_dim))
    config["corrupted"] = None
    if draw(one_in(4)):
        field, value = draw(st.sampled_from(corruptions(config) if draw(st.booleans()) else wrong_types(family)))
        config["corrupted"] = field
        if field.startswith("rope_parameters["):
            config["rope_parameters"][field.removeprefix("rope_parameters[").rstrip("]")] = value
        else:
            config[field] = value
    return config


def named_fields(config_class) -> set[str]:
    return {field.name for field in dataclasses.fields(config_class)} | {"attn_implementation"}


def batch(config, length: int, padded: bool) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, VOCAB, (2, length))
    attention_mask = torch.ones_like(input_ids)
    if padded and length > 1:
        attention_mask[1, : length // 2] = 0  # left padding in the second row
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def labels_for(head, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if head in (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForTokenClassification):
        return inputs["input_ids"] % 2 if head is AutoModelForTokenClassification else inputs["input_ids"]
    if head is AutoModelForSequenceClassification:
        return torch.tensor([0, 1])
    return None


def assert_finite_forward_and_backward(
    model, head, inputs: dict[str, torch.Tensor], dtype: torch.dtype, gradients: bool
) -> None:
    model = model.to(dtype).train()
    labels = labels_for(head, inputs)
    with torch.set_grad_enabled(gradients):
        outputs = model(**inputs, labels=labels) if labels is not None else model(**inputs)
    values = outputs.last_hidden_state if head is AutoModel else outputs.logits
    assert torch.isfinite(values).all(), f"non-finite outputs in {dtype}"
    if not gradients:
        return
    loss = values.float().square().mean() if labels is None else outputs.loss
    loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), f"non-finite gradient of {name} in {dtype}"


def check_config_space_property(drawn: dict, length: int, padded: bool, gradients: bool = True) -> None:
    drawn = copy.deepcopy(drawn)
    family, head, backend, corrupted = (drawn.pop(key) for key in ("family", "head", "backend", "corrupted"))
    try:
        config = family(**drawn, attn_implementation=backend)
    except ValueError as error:
        message = str(error)
        assert any(f"{field}=" in message or f"{field}[" in message for field in named_fields(family)), message
        event("refused by the config")
        return
    assert corrupted is None, f"{corrupted}={drawn.get(corrupted)!r} was accepted"
    if backend in BIASLESS_BACKENDS:
        assert config.position_encoding_class.kind != "bias", "a flash backend was accepted with a score bias"
        assert ATTENTION_VARIANTS[config.attention_variant].relative_encoding_name(config) is None, (
            "a flash backend was accepted with DeBERTa's terms"
        )
        backend = "eager"  # flash kernels need a GPU; the model itself runs on the reference kernel
    length = min(length, config.max_position_embeddings)
    inputs = batch(config, length, padded)
    torch.manual_seed(0)
    model = head.from_config(copy.deepcopy(config), attn_implementation=backend)
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        assert_finite_forward_and_backward(model, head, inputs, dtype, gradients)
    event("ran finite")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=configs(CPU_BACKENDS * 3 + BIASLESS_BACKENDS), length=st.integers(1, 7), padded=st.booleans())
def test_every_config_is_refused_clearly_or_runs_finite(drawn, length, padded):
    check_config_space_property(drawn, length, padded)


@pytest.mark.slow
@pytest.mark.flex
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=configs(("flex_attention",)), length=st.integers(1, 7), padded=st.booleans())
def test_every_config_is_refused_clearly_or_runs_finite_on_flex(drawn, length, padded):
    """Flex compiles a kernel per shape on the CPU (about 15 s each), so it has its own, slow run. torch has no
    flex backward on the CPU: forward only."""
    check_config_space_property(drawn, length, padded, gradients=False)


def test_the_strategy_reaches_both_outcomes():
    """Guard against a strategy that silently stopped exploring: draws must be both accepted and refused."""
    outcomes = {"accepted": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True)
    @given(drawn=configs(CPU_BACKENDS))
    def sample(drawn):
        drawn = copy.deepcopy(drawn)
        family, _, backend, _ = (drawn.pop(key) for key in ("family", "head", "backend", "corrupted"))
        try:
            family(**drawn, attn_implementation=backend)
            outcomes["accepted"] += 1
        except ValueError:
            outcomes["refused"] += 1

    sample()
    assert min(outcomes.values()) >= 30, outcomes


VALID_BASES = {
    "defaults": dict(position_encoding="sinusoidal"),
    "longrope": dict(position_encoding="rope", rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 8,
        "short_factor": [1.0, 1.0], "long_factor": [2.0, 2.0]}),
    "t5 bias": dict(position_encoding="t5_bias", relative_attention_num_buckets=8, relative_attention_max_distance=16),
    "differential": dict(attention_variant="differential"),
    "deberta": dict(position_encoding="nope", position_buckets=4, attention_variant="disentangled"),
}


def valid_base(family, overrides: dict) -> dict:
    """A config in the strategy's format that the family accepts, for the corruption table."""
    fields = dict(vocab_size=VOCAB, hidden_size=8, intermediate_size=4, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                  position_encoding="sinusoidal", attention_variant="standard", family=family)
    fields.update(overrides)
    family(**{key: value for key, value in fields.items() if key != "family"})  # accepted as it stands
    return fields


CORRUPTION_CASES = [
    *((family, base) for family in FAMILIES if family is not PosVarDebertaConfig for base in VALID_BASES if base != "deberta"),
    (PosVarDebertaConfig, "deberta"),
]


@pytest.mark.parametrize("family,base", CORRUPTION_CASES, ids=[f"{f.model_type}-{b}" for f, b in CORRUPTION_CASES])
def test_every_corruption_of_the_strategy_is_refused_naming_its_field(family, base):
    """The corruption table, exhaustively, on valid configs: each bad value is a ValueError that names it."""
    config = valid_base(family, VALID_BASES[base])
    for field, value in corruptions(config) + wrong_types(family):
        fields = {key: copy.deepcopy(item) for key, item in config.items() if key != "family"}
        if field.startswith("rope_parameters["):
            key = field.removeprefix("rope_parameters[").rstrip("]")
            fields["rope_parameters"][key] = value
            shown = f"rope_parameters['{key}']"
        else:
            fields[field] = value
            shown = f"{field}="
        with pytest.raises(ValueError) as error:
            family(**fields)
        assert shown in str(error.value), (field, value, str(error.value))
