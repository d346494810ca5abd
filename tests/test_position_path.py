"""The one position path: computed once per forward, a score function on flex, a lean mask on eager/SDPA,
and a value that survives gradient checkpointing in both modes."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODINGS, FAMILY_CONFIGS, VOCAB, build, tiny_config
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from hf_posvariants import POSITION_ENCODINGS, PosVarDebertaConfig
from hf_posvariants.attention import ATTENTION_VARIANTS
from hf_posvariants.position_encodings import DistanceBias, distance_grid

BIAS_ENCODINGS = sorted(name for name in ENCODINGS if POSITION_ENCODINGS[name].kind == "bias")
# Biases of the distance alone: one (1, H, Q, K) tensor for the batch (FIRE also reads the query's position).
DISTANCE_ENCODINGS = sorted(name for name in BIAS_ENCODINGS if issubclass(POSITION_ENCODINGS[name], DistanceBias))
# The seed schemes run on flex by default; the newer ones (tests/test_newer_encodings.py) under -m slow.
SEED_BIAS_ENCODINGS = ("alibi", "t5_bias")


def deberta_config(**overrides) -> PosVarDebertaConfig:
    fields = dict(num_key_value_heads=4, position_encoding="nope", position_buckets=8, max_relative_positions=-1)
    fields.update(overrides)
    return tiny_config(PosVarDebertaConfig, **fields)


def variant_config(variant: str, encoding: str):
    """A tiny config running `variant` with `encoding`: the LLaMA family, or DeBERTa for the variant that needs
    DeBERTa's fields (`encoding` is then its input encoding)."""
    if variant == "disentangled":
        return deberta_config(position_encoding=encoding)
    return tiny_config(FAMILY_CONFIGS[1], encoding, attention_variant=variant)


def padded(auto_class, lengths=(12, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoders pad on the left (as for generation), encoders on the right."""
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        real = slice(width - length, width) if auto_class is AutoModelForCausalLM else slice(0, length)
        mask[row, real] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("offset", [0, 5], ids=["prefill", "cached"])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("encoding", DISTANCE_ENCODINGS)
def test_score_function_equals_materialised_bias(encoding, is_causal, offset):
    # Evaluated eagerly on broadcast index tensors, the flex score function must give the tensor eager/SDPA add.
    config = tiny_config(FAMILY_CONFIGS[0], encoding, num_attention_heads=4)
    module = POSITION_ENCODINGS[encoding](config, is_causal)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    query_slots, key_slots = torch.arange(offset, offset + 4), torch.arange(offset + 4)
    bias = module.score_bias(query_slots, key_slots)
    heads, queries, keys = torch.arange(4)[:, None, None], torch.arange(4)[None, :, None], torch.arange(offset + 4)[None, None, :]
    from_function = bias.score_mod()(torch.zeros(()), torch.zeros((), dtype=torch.long), heads, queries, keys)
    materialised = bias.materialise()
    assert materialised.shape == (1, 4, 4, offset + 4)
    torch.testing.assert_close(from_function, materialised[0])
    # And both are the encoding's definition: a function of key slot - query slot only.
    relative = key_slots[None, :] - query_slots[:, None]
    for i in range(4):
        for j in range(offset + 4):
            same_distance = relative == relative[i, j]
            assert torch.all(materialised[0][:, same_distance] == materialised[0, :, i, j][:, None])


def test_tables_are_per_distance_not_per_pair():
    config = tiny_config(FAMILY_CONFIGS[0], "t5_bias")
    bias = POSITION_ENCODINGS["t5_bias"](config, True).score_bias(torch.arange(2048), torch.arange(2048))
    assert [tuple(table.shape) for table in bias.tables] == [(4, 4095)]


def test_distance_grid_indexes_key_minus_query():
    grid = distance_grid(3, 5, torch.device("cpu"))
    assert grid[0, 0] == 2 and grid[2, 0] == 0 and grid[0, 4] == 6


@pytest.mark.parametrize("encoding", DISTANCE_ENCODINGS)
def test_folded_bias_is_one_broadcast_tensor_in_the_compute_dtype(encoding):
    # No padding: the mask that carries the bias is (1, H, Q, K), shared by the batch, in the model's dtype.
    model = build(AutoModel, tiny_config(FAMILY_CONFIGS[1], encoding), "sdpa").to(torch.bfloat16)
    seen = []
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    model(input_ids=torch.randint(3, VOCAB, (3, 7)))
    assert seen[0].shape == (1, 4, 7, 7) and seen[0].dtype == torch.bfloat16


FLEX_CASES = [(variant, encoding) for variant in ATTENTION_VARIANTS for encoding in BIAS_ENCODINGS if variant != "disentangled"]
FLEX_CASES += [("disentangled", "nope"), ("disentangled", "learned")]
FLEX_PARAMS = [
    pytest.param(v, e, id=f"{v}-{e}", marks=[] if v == "disentangled" or e in SEED_BIAS_ENCODINGS else [pytest.mark.slow])
    for v, e in FLEX_CASES
]


@pytest.mark.flex
@pytest.mark.parametrize(("variant", "encoding"), FLEX_PARAMS)
def test_flex_score_functions_match_eager(variant, encoding):
    """Every bias encoding and DeBERTa's position terms on flex (block mask + score_mod) ≡ eager, with padding.
    Forward only: flex has no CPU backward."""
    config = variant_config(variant, encoding)
    heads = [AutoModelForMaskedLM] if isinstance(config, PosVarDebertaConfig) else [AutoModelForCausalLM, AutoModelForMaskedLM]
    for head in heads:
        eager, flex = build(head, config, "eager"), build(head, config, "flex_attention")
        ids, mask = padded(head)
        with torch.no_grad():
            reference = eager(input_ids=ids, attention_mask=mask).logits
            candidate = flex(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(candidate[mask.bool()], reference[mask.bool()], rtol=0, atol=1e-5)


CHECKPOINT_CASES = [(config_class, encoding) for config_class in FAMILY_CONFIGS for encoding in ENCODINGS]
CHECKPOINT_CASES += [(PosVarDebertaConfig, "nope"), (PosVarDebertaConfig, "learned")]


@pytest.mark.parametrize(
    ("config_class", "encoding"), CHECKPOINT_CASES, ids=[f"{c.model_type}-{e}" for c, e in CHECKPOINT_CASES]
)
def test_gradient_checkpointing_gives_the_same_gradients(config_class, encoding):
    # Reentrant checkpointing once failed for t5_bias and DeBERTa ("backward through the graph a second time").
    if config_class is PosVarDebertaConfig:
        config, head = deberta_config(position_encoding=encoding), AutoModelForMaskedLM
    else:
        config, head = tiny_config(config_class, encoding), AutoModelForCausalLM
    ids, mask = padded(head)
    gradients = []
    for checkpointing in (None, {"use_reentrant": True}, {"use_reentrant": False}):
        model = build(head, config, "sdpa").train()
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    reference = gradients[0]
    for candidate in gradients[1:]:
        assert candidate.keys() == reference.keys()
        for name, gradient in reference.items():
            torch.testing.assert_close(candidate[name], gradient, atol=1e-6, rtol=1e-5, msg=name)
