"""Parity with transformers' own models and with the papers' closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILY_CONFIGS, VOCAB, build, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, LlamaConfig, LlamaForCausalLM, T5Config
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
from transformers.models.t5.modeling_t5 import T5Attention

from hf_posvariants import POSITION_ENCODINGS, PosVarLlamaConfig
from hf_posvariants.position_encodings import (
    ALiBiBias,
    SinusoidalPositionEncoding,
    T5RelativeBias,
    alibi_slopes,
    t5_relative_bucket,
    apply_rotary,
)

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10_000.0},
    "theta_500k": {"rope_type": "default", "rope_theta": 500_000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10_000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 10_000.0,
        "short_factor": [1.0, 1.1, 1.3, 1.6],
        "long_factor": [1.0, 2.0, 3.0, 5.0],
        "original_max_position_embeddings": 16,
    },
}
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def llama_pair(rope_parameters: dict):
    ours = build(AutoModelForCausalLM, PosVarLlamaConfig(**SHAPE, rope_parameters=dict(rope_parameters)), "eager")
    theirs = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters=dict(rope_parameters), rms_norm_eps=1e-6))
    theirs.load_state_dict(ours.state_dict(), strict=True)  # identical parameter names, no renaming
    return ours, theirs.eval()


@pytest.mark.parametrize("rope_name", list(ROPE_PARAMETERS))
def test_llama_rope_matches_transformers_llama(rope_name):
    ours, theirs = llama_pair(ROPE_PARAMETERS[rope_name])
    ids = torch.randint(3, VOCAB, (2, 40))  # longer than original_max_position_embeddings: scalings engage
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)


def test_llama_generation_matches_transformers_llama():
    ours, theirs = llama_pair(ROPE_PARAMETERS["default"])
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    settings = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    torch.testing.assert_close(ours.generate(ids, **settings), theirs.generate(ids, **settings), rtol=0, atol=0)


def test_partial_rotary_leaves_the_rest_of_the_head_alone():
    query, key = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    angles = torch.randn(1, 5, 2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotated_query, rotated_key = apply_rotary(query, key, cos, sin)
    torch.testing.assert_close(rotated_query[..., 4:], query[..., 4:])
    torch.testing.assert_close(rotated_key[..., 4:], key[..., 4:])
    # A rotation preserves the norm of every rotated pair.
    torch.testing.assert_close(rotated_query[..., :4].norm(dim=-1), query[..., :4].norm(dim=-1))


@pytest.mark.parametrize("is_decoder", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20)])
def test_t5_bias_matches_transformers_t5(is_decoder, buckets, max_distance):
    t5_config = T5Config(num_heads=4, d_model=32, d_kv=8, relative_attention_num_buckets=buckets,
                         relative_attention_max_distance=max_distance, is_decoder=is_decoder)
    theirs = T5Attention(t5_config, has_relative_attention_bias=True)
    config = tiny_config(PosVarLlamaConfig, "t5_bias", relative_attention_num_buckets=buckets,
                         relative_attention_max_distance=max_distance, num_key_value_heads=4)
    ours = T5RelativeBias(config, is_causal=is_decoder)
    ours.relative_attention_bias.weight.data.copy_(theirs.relative_attention_bias.weight.data)
    query_length, key_length, past = 7, 300, 293  # distances well beyond max_distance
    with torch.no_grad():
        expected = theirs.compute_bias(query_length, key_length, past_seen_tokens=past)
        actual = ours.attention_bias(torch.arange(past, past + query_length), torch.arange(key_length))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# (num_buckets, max_distance): every even bucket count from 4 to 256 under every max distance above it.
T5_BUCKET_GRID = [
    (buckets, max_distance)
    for buckets in range(4, 257, 2)
    for max_distance in (16, 20, 32, 50, 64, 100, 128, 200, 256, 300, 512, 1000, 1024, 2048)
    if max_distance > buckets
]


def t5_bucket_mismatches(settings) -> list[tuple[int, int, bool, list[int]]]:
    """(num_buckets, max_distance, bidirectional, distances) wherever ours and transformers' T5 disagree, over every
    signed distance up to two past max_distance."""
    mismatches = []
    for buckets, max_distance in settings:
        relative = torch.arange(-max_distance - 2, max_distance + 3)
        for bidirectional in (False, True):
            ours = t5_relative_bucket(relative, bidirectional, buckets, max_distance)
            theirs = T5Attention._relative_position_bucket(relative, bidirectional, buckets, max_distance)
            if not torch.equal(ours, theirs):
                mismatches.append((buckets, max_distance, bidirectional, relative[ours != theirs].tolist()))
    return mismatches


# Where adding the exact buckets before truncating the logarithmic part rounded up to the next bucket (of 2,100).
@pytest.mark.contract
@pytest.mark.parametrize("buckets,max_distance", [(154, 2048), (158, 512), (166, 1000), (194, 2048)])
def test_t5_buckets_where_rounding_once_differed(buckets, max_distance):
    assert t5_bucket_mismatches([(buckets, max_distance)]) == []


@pytest.mark.slow
def test_t5_buckets_match_transformers_over_the_whole_grid():
    assert len(T5_BUCKET_GRID) * 2 == 2100
    assert t5_bucket_mismatches(T5_BUCKET_GRID) == []


def paper_slopes(num_heads: int) -> list[float]:
    """Press et al.: for 8 heads 1/2, 1/4, ..., 1/256; the start of the sequence is 2^(-8/n)."""
    start = 2 ** (-8 / num_heads)
    return [start ** (i + 1) for i in range(num_heads)]


@pytest.mark.parametrize("num_heads", [1, 2, 4, 8, 16])
def test_alibi_slopes_for_powers_of_two_match_paper_mpt_and_bloom(num_heads):
    ours = alibi_slopes(num_heads)
    torch.testing.assert_close(ours, torch.tensor(paper_slopes(num_heads)))
    mpt = build_mpt_alibi_tensor(num_heads, 2)[:, 0, 0] * -1  # MPT's bias at distance 1 is -slope
    torch.testing.assert_close(ours, mpt)
    bloom = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1]  # slope × position 1
    torch.testing.assert_close(ours, bloom)


@pytest.mark.parametrize("num_heads", [3, 5, 6, 12, 20])
def test_alibi_slopes_for_other_head_counts_match_bloom(num_heads):
    """BLOOM follows the paper's recipe for head counts that are not powers of two (MPT orders them differently)."""
    bloom = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(num_heads), bloom)


def test_alibi_bias_equals_bloom_and_mpt_up_to_softmax_invariant_row_shift():
    num_heads, length = 6, 9
    config = tiny_config(PosVarLlamaConfig, "alibi", hidden_size=48, num_attention_heads=num_heads, num_key_value_heads=6)
    bias = ALiBiBias(config, is_causal=True).attention_bias(torch.arange(length), torch.arange(length))[0]  # (H, Q, K)
    bloom = build_alibi_tensor(torch.ones(1, length), num_heads, torch.float32)[:, 0]  # (H, K): slope × key position
    causal = torch.ones(length, length).tril().bool()
    shift = bias - bloom[:, None, :]  # must depend on the query row only
    for row in range(length):
        visible = shift[:, row, causal[row]]
        torch.testing.assert_close(visible, visible[:, :1].expand_as(visible))
    scores = torch.randn(num_heads, length, length)
    ours_probs = (scores + bias).masked_fill(~causal, -math.inf).softmax(-1)
    bloom_probs = (scores + bloom[:, None, :]).masked_fill(~causal, -math.inf).softmax(-1)
    torch.testing.assert_close(ours_probs, bloom_probs)
    # MPT's bias is the last query row's bias (distance to the final token), for power-of-two slopes.
    config8 = tiny_config(PosVarLlamaConfig, "alibi", num_attention_heads=8, num_key_value_heads=8)
    last_row = ALiBiBias(config8, is_causal=True).attention_bias(torch.tensor([length - 1]), torch.arange(length))
    torch.testing.assert_close(last_row[0, :, 0], build_mpt_alibi_tensor(8, length)[:, 0])


def test_alibi_symmetric_form_for_encoders():
    config = tiny_config(PosVarLlamaConfig, "alibi", num_key_value_heads=4)
    bias = ALiBiBias(config, is_causal=False).attention_bias(torch.arange(5), torch.arange(5))[0]
    torch.testing.assert_close(bias, bias.transpose(-1, -2))
    torch.testing.assert_close(bias[0, 0, 4], -alibi_slopes(4)[0] * 4)


def test_sinusoidal_matches_closed_form_table():
    dim, length = 6, 10
    table = torch.zeros(length, dim)
    for position in range(length):
        for i in range(dim // 2):
            angle = position / (10_000 ** (2 * i / dim))
            table[position, 2 * i], table[position, 2 * i + 1] = math.sin(angle), math.cos(angle)
    config = tiny_config(PosVarLlamaConfig, "sinusoidal", hidden_size=dim, num_attention_heads=1, num_key_value_heads=1)
    encoding = SinusoidalPositionEncoding(config, is_causal=False)
    added = encoding.add_to_embeddings(torch.zeros(1, length, dim), torch.arange(length)[None])
    torch.testing.assert_close(added[0], table)


BIAS_ENCODINGS = sorted(name for name, cls in POSITION_ENCODINGS.items() if cls.kind == "bias")


class SharedBiasAsLayerBias(torch.nn.Module):
    """Stands in for a layer's contextual positions, so the layer hands the model's shared bias to the kernel as its
    own (B|1, H, Q, K) tensor (transformers' `position_bias`), in the kernel's head order."""

    def __init__(self, attention: torch.nn.Module, computed: dict):
        super().__init__()
        self.kernel_order = getattr(attention, "maps_first", lambda bias: bias)
        self.computed = computed

    def forward(self, query, key, attention_mask, scaling):
        return self.kernel_order(self.computed["bias"].materialise())


def add_shared_bias_per_layer(model) -> None:
    """The shared bias kept out of the mask and added by every layer instead: the reference for folding it in."""
    encoding, computed = model.position_encoding, {}
    score_bias = encoding.score_bias

    def withheld(*args, **kwargs):
        computed["bias"] = score_bias(*args, **kwargs)

    encoding.score_bias = withheld
    for layer in model.layers:
        layer.self_attn.contextual_positions = SharedBiasAsLayerBias(layer.self_attn, computed)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("head", [AutoModelForCausalLM, AutoModelForMaskedLM], ids=["causal", "masked"])
@pytest.mark.parametrize("encoding", BIAS_ENCODINGS)
@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=lambda c: c.model_type)
def test_bias_folded_into_mask_equals_bias_per_layer(config_class, encoding, head, backend):
    """The shared bias travels inside the mask on eager/SDPA; logits and bias gradients are unchanged."""
    model = build(head, tiny_config(config_class, encoding), backend).train()
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # padding on one row: the boolean/float mask path, not only the mask-free one
    results = []
    for fold in (True, False):
        model.zero_grad()
        if not fold:
            add_shared_bias_per_layer(model.base_model)
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[mask.bool()].square().sum().backward()
        grads = [p.grad.clone() for p in model.base_model.position_encoding.parameters()]
        results.append((logits[mask.bool()].detach(), grads))
    (folded, folded_grads), (per_layer, per_layer_grads) = results
    torch.testing.assert_close(folded, per_layer, atol=1e-6, rtol=1e-5)
    for a, b in zip(folded_grads, per_layer_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
