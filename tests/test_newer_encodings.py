"""The newer position schemes: each one's maths on a tiny input against the paper's formula, the
contract checks again with randomised position parameters (CoPE and KERPLE start from values that hide
mistakes), flex parity, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILY_CONFIGS, VOCAB, build, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from hf_posvariants import POSITION_ENCODINGS, PosVarLlamaConfig
from hf_posvariants.position_encodings import (
    ContextualPositions,
    FIREBias,
    KerpleBias,
    PositionEncoding,
    alibi_slopes,
    rotate,
)

NEWER = ["cope", "dynamic_bias", "fire", "kerple", "xpos"]
LLAMA, DIFF = FAMILY_CONFIGS[1], FAMILY_CONFIGS[2]


def encoding_module(name: str, is_causal: bool = True, **overrides) -> PositionEncoding:
    return POSITION_ENCODINGS[name](tiny_config(LLAMA, name, **overrides), is_causal)


# --- xPos -------------------------------------------------------------------------------------------------------


def test_xpos_score_is_rope_times_the_papers_decay():
    # Sun et al. 2022, eq. 9: q_n·k_m gains ζ_i^((n − m)/B) per channel pair, ζ_i = (2i/d + γ)/(1 + γ), γ = 0.4.
    dim, base = 8, 4.0
    encoding = encoding_module("xpos", hidden_size=dim, num_attention_heads=1, num_key_value_heads=1, xpos_scale_base=base)
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(dim, generator=generator), torch.randn(dim, generator=generator)
    positions = torch.tensor([[0, 3, 7, 20]])
    cos_q, sin_q = encoding.rotary_embeddings(torch.zeros(1), positions)
    cos_k, sin_k = encoding.key_rotary_embeddings(torch.zeros(1), positions)
    rotated_q = rotate(query.expand(1, 1, 4, dim), cos_q, sin_q)[0, 0]  # (4, d): the query at each position
    rotated_k = rotate(key.expand(1, 1, 4, dim), cos_k, sin_k)[0, 0]
    half = dim // 2
    theta = 10_000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    zeta = (torch.arange(half, dtype=torch.float64) * 2 / dim + 0.4) / 1.4
    q_complex = torch.complex(query[:half].double(), query[half:].double())
    k_complex = torch.complex(key[:half].double(), key[half:].double())
    for a, n in enumerate(positions[0].tolist()):
        for b, m in enumerate(positions[0].tolist()):
            expected = (q_complex * k_complex.conj() * torch.exp(1j * theta * (n - m))).real * zeta ** ((n - m) / base)
            assert rotated_q[a] @ rotated_k[b] == pytest.approx(expected.sum().item(), rel=1e-4, abs=1e-5)


def test_xpos_scale_is_one_at_the_fixed_centre():
    # The exponent counts from max_position_embeddings // 2, so the factors stay near 1 over the trained range.
    encoding = encoding_module("xpos", max_position_embeddings=1024)
    position = torch.tensor([[512]])
    for hook in (encoding.rotary_embeddings, encoding.key_rotary_embeddings):
        cos, sin = hook(torch.zeros(1), position)
        angles = 512.0 * torch.cat([encoding.inv_freq] * 2)
        torch.testing.assert_close(cos[0, 0], angles.cos())
        torch.testing.assert_close(sin[0, 0], angles.sin())


# --- KERPLE -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_kernels_follow_the_paper(variant):
    # Chi et al. 2022, eq. 11-12: log −r1·log(1 + r2·|m − n|), power −r1·|m − n|^r2.
    encoding = encoding_module("kerple", kerple_variant=variant)
    with torch.no_grad():
        encoding.scale.copy_(torch.tensor([0.5, 1.0, 2.0, 0.001]))  # the last one is clamped to 0.01
        encoding.shape_parameter.copy_(torch.tensor([0.3, 1.5, 3.0, 0.7]))  # 3.0 is clamped to 2 (power)
    relative = torch.arange(-3, 4)
    table = encoding.distance_table(relative)
    r1 = [0.5, 1.0, 2.0, 0.01]
    r2 = [0.3, 1.5, 2.0 if variant == "power" else 3.0, 0.7]
    for head in range(4):
        for column, distance in enumerate(relative.abs().tolist()):
            if variant == "log":
                expected = -r1[head] * math.log(1 + r2[head] * distance)
            else:
                expected = -r1[head] * distance ** r2[head]
            assert table[head, column].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_kerple_power_starts_as_alibi():
    # Where ALiBi's slope is above the clamp (8 heads: the first six), the power kernel starts as ALiBi exactly.
    kerple, alibi = encoding_module("kerple", kerple_variant="power", num_attention_heads=8, num_key_value_heads=8), encoding_module("alibi", num_attention_heads=8, num_key_value_heads=8)
    relative = torch.arange(-5, 6)
    above = alibi_slopes(8) >= KerpleBias.min_parameter
    assert above.sum() == 6
    torch.testing.assert_close(kerple.distance_table(relative)[above], alibi.distance_table(relative)[above])


def test_kerple_parameters_learn():
    encoding = encoding_module("kerple")
    encoding.distance_table(torch.arange(-4, 1)).sum().backward()
    assert encoding.scale.grad.abs().sum() > 0 and encoding.shape_parameter.grad.abs().sum() > 0


# --- dynamic position bias --------------------------------------------------------------------------------------


def test_dynamic_bias_is_an_mlp_of_the_log_spaced_distance():
    encoding = encoding_module("dynamic_bias", dynamic_bias_hidden_size=5, dynamic_bias_layers=2)
    relative = torch.arange(-6, 7)
    features = torch.tensor([math.copysign(math.log(1 + abs(r)), r) for r in relative.tolist()])[:, None]
    hidden = features
    for layer in encoding.mlp:
        hidden = layer(hidden)  # Linear, SiLU, Linear, SiLU, Linear
    assert len(encoding.mlp) == 5
    torch.testing.assert_close(encoding.distance_table(relative), hidden.T)


# --- FIRE -------------------------------------------------------------------------------------------------------


def fire_by_hand(encoding, query_position: int, key_position: int) -> torch.Tensor:
    """Li et al. 2024, eq. 6: f_θ(ψ(i − j) / ψ(max(L, i))), ψ(x) = log(c·x + 1), by hand from the weights."""
    c = abs(encoding.distance_scale.item())
    threshold = abs(encoding.threshold_scale.item()) * encoding.initial_threshold
    x = math.log(c * abs(query_position - key_position) + 1) / (math.log(c * max(threshold, query_position) + 1) + 1e-6)
    first, second = encoding.mlp[0], encoding.mlp[2]
    hidden = torch.relu(first.weight[:, 0] * x + first.bias)
    return second.weight @ hidden + second.bias  # (H,)


def randomised_fire(**overrides):
    encoding = encoding_module("fire", **{"fire_threshold": 4.0, "fire_mlp_width": 6, **overrides})
    with torch.no_grad():
        for parameter in encoding.mlp.parameters():
            parameter.normal_()
        encoding.distance_scale.fill_(0.7)
        encoding.threshold_scale.fill_(1.25)  # L = 5 at the default fire_threshold
    return encoding


def test_fire_interpolated_distance_below_and_beyond_the_threshold():
    encoding = randomised_fire()
    # Row 0 is a left-padded sequence (positions 0 0 0 1 2 ...), row 1 a plain one.
    position_ids = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6, 7], list(range(10))])
    slots = torch.arange(10)
    materialised = encoding.score_bias(slots, slots, position_ids).materialise().detach()
    assert materialised.shape == (2, 4, 10, 10)
    for row in range(2):
        for i in range(10):
            for j in range(i + 1):
                # Distances are slot differences; the normaliser reads the query's position (padding-free).
                expected = fire_by_hand(encoding, int(position_ids[row, i]), int(position_ids[row, i]) - (i - j))
                torch.testing.assert_close(materialised[row, :, i, j], expected.detach(), rtol=1e-5, atol=1e-5)
    normalised = encoding.interpolated_distance(torch.tensor(9.0), torch.tensor(9.0), torch.tensor(0.7), torch.tensor(5.0))
    assert normalised.item() == pytest.approx(1.0, abs=1e-5)  # the farthest visible key maps to 1 beyond L


@pytest.mark.parametrize("offset", [0, 3], ids=["prefill", "cached"])
def test_fire_score_function_equals_materialised_bias(offset):
    encoding = randomised_fire()
    query_slots, key_slots = torch.arange(offset, offset + 4), torch.arange(offset + 4)
    position_ids = torch.stack([query_slots, query_slots - 1]).clamp(min=0)
    bias = encoding.score_bias(query_slots, key_slots, position_ids)
    materialised = bias.materialise()
    batch = torch.arange(2)[:, None, None, None]
    heads, queries = torch.arange(4)[None, :, None, None], torch.arange(4)[None, None, :, None]
    keys = torch.arange(offset + 4)[None, None, None, :]
    from_function = bias.score_mod()(torch.zeros(()), batch, heads, queries, keys)
    torch.testing.assert_close(from_function, materialised, rtol=1e-5, atol=1e-5)


def test_fire_score_function_with_one_row_of_positions_for_a_batch():
    # position_ids of shape (1, Q) serve every row: the score function must not read past that row.
    encoding = randomised_fire()
    slots = torch.arange(6)
    bias = encoding.score_bias(slots, slots, slots[None])
    batch, heads = torch.arange(3)[:, None, None, None], torch.arange(4)[None, :, None, None]
    queries, keys = torch.arange(6)[None, None, :, None], torch.arange(6)[None, None, None, :]
    from_function = bias.score_mod()(torch.zeros(()), batch, heads, queries, keys)  # reading row 1 or 2 would fail
    torch.testing.assert_close(from_function.expand(3, -1, -1, -1), bias.materialise().expand(3, -1, -1, -1), rtol=1e-5, atol=1e-5)


def test_fire_threshold_parameters_learn():
    encoding = randomised_fire()
    slots = torch.arange(8)
    encoding.score_bias(slots, slots, slots[None]).materialise().sum().backward()
    assert encoding.distance_scale.grad != 0 and encoding.threshold_scale.grad != 0


def pairwise_fire_bias(encoding, tables, query_length: int, key_length: int) -> torch.Tensor:
    """FIRE's bias as the MLP run on every (query, key) pair: the reference the factorised bias must equal."""
    grid = torch.arange(key_length)[None, :] - torch.arange(query_length)[:, None] + tables.offset  # j − i
    x = encoding.interpolated_distance(grid[None], tables.positions[:, :, None], tables.c, tables.threshold)
    return encoding.mlp(x[..., None]).permute(0, 3, 1, 2)  # (B, H, Q, K)


def fire_gradients(encoding, bias: torch.Tensor, probe: torch.Tensor) -> list[torch.Tensor]:
    parameters = [encoding.distance_scale, encoding.threshold_scale, *encoding.mlp.parameters()]
    return torch.autograd.grad((bias * probe).sum(), parameters)


@pytest.mark.parametrize("threshold", [4.0, 64.0], ids=["queries-beyond-L", "queries-below-L"])
@pytest.mark.parametrize("offset", [0, 3], ids=["prefill", "cached"])
def test_fire_factorised_bias_equals_the_pairwise_mlp(threshold, offset):
    # Values and every gradient (c, L, the MLP) of the bias built from its pieces ≡ the MLP run per pair; left
    # padding makes the rows' positions differ. One unit has input weight 0 (it never switches), on, one off.
    encoding = randomised_fire(fire_threshold=threshold)
    with torch.no_grad():
        encoding.mlp[0].weight[:2] = 0
        encoding.mlp[0].bias[:2] = torch.tensor([0.5, -0.5])
    query_slots, key_slots = torch.arange(offset, offset + 10), torch.arange(offset + 10)
    position_ids = torch.stack([(query_slots - 3).clamp(min=0), query_slots])
    probe = torch.randn(2, 4, 10, offset + 10)
    factorised = encoding.score_bias(query_slots, key_slots, position_ids).materialise()
    tables = encoding.score_bias(query_slots, key_slots, position_ids).tables
    reference = pairwise_fire_bias(encoding, tables, 10, offset + 10)
    torch.testing.assert_close(factorised, reference, rtol=1e-5, atol=1e-5)
    expected_gradients = fire_gradients(encoding, reference, probe)
    for candidate, expected in zip(fire_gradients(encoding, factorised, probe), expected_gradients):
        torch.testing.assert_close(candidate, expected, rtol=1e-5, atol=1e-5)


def test_fire_bias_keeps_nothing_per_pair_and_unit_for_the_backward():
    # The MLP run per pair kept (B, Q, K, width) activations for its backward; the factorised bias keeps its factors.
    encoding = randomised_fire(fire_mlp_width=16)
    slots = torch.arange(24)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor.numel()) or tensor, lambda t: t):
        bias = encoding.score_bias(slots, slots, torch.stack([slots, slots + 1])).materialise()
    assert bias.shape == (2, 4, 24, 24)
    assert max(saved) < 24 * 24


@pytest.mark.parametrize("rows", ["expanded", "equal", "padded"])
def test_fire_builds_one_bias_for_a_batch_whose_rows_share_positions(rows):
    encoding = randomised_fire()
    slots = torch.arange(8)
    position_ids = {"expanded": slots[None].expand(3, -1), "equal": slots[None].repeat(3, 1),
                    "padded": torch.stack([slots, slots, (slots - 2).clamp(min=0)])}[rows]
    bias = encoding.score_bias(slots, slots, position_ids).materialise()
    assert bias.shape == (1 if rows != "padded" else 3, 4, 8, 8)
    per_row = encoding.score_bias(slots, slots).tables._replace(positions=position_ids.float())
    reference = pairwise_fire_bias(encoding, per_row, 8, 8)
    torch.testing.assert_close(bias.expand(3, -1, -1, -1), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threshold", [4.0, 64.0], ids=["queries-beyond-L", "queries-below-L"])
def test_fire_training_step_on_sdpa_equals_the_pairwise_mlp(monkeypatch, threshold):
    # A whole step through CPU SDPA's gradient kernel, left padding: every gradient (q/k projections, the MLP, c, L)
    # as when the bias is the MLP run per pair.
    config = tiny_config(LLAMA, "fire", fire_threshold=threshold, fire_mlp_width=8)
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    gradients = []
    for factorised in (True, False):
        if not factorised:
            monkeypatch.setattr(FIREBias, "materialise_bias", pairwise_fire_bias)
        model = build(AutoModelForCausalLM, config, "sdpa").train()
        with torch.no_grad():
            for parameter in model.model.position_encoding.mlp.parameters():
                parameter.normal_(generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    assert gradients[0]["model.position_encoding.threshold_scale"] != 0
    for name, expected in gradients[1].items():
        torch.testing.assert_close(gradients[0][name], expected, rtol=1e-4, atol=1e-6, msg=name)


# --- CoPE -------------------------------------------------------------------------------------------------------


def cope_by_hand(query, key, embeddings, scaling, is_causal, max_positions):
    """Golovneva et al. 2024, eq. 3-5, one (query, key) pair at a time: gates σ(q_i·k_t), p_ij = Σ_t g_it over t
    between j and i, e[p] interpolated, bias q_i·e[p_ij]."""
    length = query.shape[0]
    bias = torch.zeros(length, length)
    for i in range(length):
        for j in range(length):
            if is_causal and j > i:
                continue
            span = range(min(i, j), max(i, j) + 1)
            count = min(sum(torch.sigmoid(query[i] @ key[t] * scaling).item() for t in span), max_positions - 1)
            low, high = math.floor(count), math.ceil(count)
            weight = count - low
            embedding = (1 - weight) * embeddings[:, low] + weight * embeddings[:, high]
            bias[i, j] = query[i] @ embedding
    return bias


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
def test_cope_gated_counts_and_interpolation(is_causal):
    config = tiny_config(LLAMA, "cope", cope_max_positions=4)  # counts beyond 3 are clamped
    module = ContextualPositions(config, is_causal)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.embeddings.copy_(torch.randn(module.embeddings.shape, generator=generator))
    query, key = torch.randn(1, 1, 7, 8, generator=generator) * 2, torch.randn(1, 1, 7, 8, generator=generator) * 2
    bias = module(query, key, None, scaling=8**-0.5)[0, 0]
    expected = cope_by_hand(query[0, 0], key[0, 0], module.embeddings, 8**-0.5, is_causal, 4)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril() if is_causal else torch.ones(7, 7, dtype=torch.bool)
    torch.testing.assert_close(bias[allowed], expected[allowed], rtol=1e-5, atol=1e-5)


def test_cope_counts_ignore_masked_keys():
    # A padded key has gate 0: the counts of the real keys are those of the unpadded sequence.
    module = ContextualPositions(tiny_config(LLAMA, "cope"), is_causal=True)
    with torch.no_grad():
        module.embeddings.normal_()
    query, key = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    mask[..., :2] = False
    padded = module(query, key, mask, scaling=0.3)[..., 2:, 2:]
    alone = module(query[:, :, 2:], key[:, :, 2:], None, scaling=0.3)
    torch.testing.assert_close(padded.tril(), alone.tril())


# --- the contract again, with every position parameter randomised -----------------------------------------------


def randomise_positions(model: torch.nn.Module, seed: int = 0) -> None:
    """CoPE's tables start at zero and KERPLE/FIRE at fixed values: give every position parameter a random value, so
    the checks below see a position signal that matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (PositionEncoding, ContextualPositions)):
                for parameter in module.parameters(recurse=True):
                    parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.2)


def padded_batch(auto_class, lengths=(9, 6)):
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, slice(width - length, width) if auto_class is AutoModelForCausalLM else slice(0, length)] = 1
    return ids.masked_fill(mask == 0, 0), mask


def randomised(auto_class, config, backend="sdpa"):
    model = build(auto_class, config, backend)
    randomise_positions(model)
    return model


@pytest.mark.parametrize("config_class", [LLAMA, DIFF], ids=lambda c: c.model_type)
@pytest.mark.parametrize("encoding", NEWER)
def test_randomised_positions_eager_sdpa_padding_and_cache(config_class, encoding):
    config = tiny_config(config_class, encoding, max_position_embeddings=16, xpos_scale_base=4.0, fire_threshold=4.0)
    for head in (AutoModelForCausalLM, AutoModelForMaskedLM):
        eager, sdpa = randomised(head, config, "eager"), randomised(head, config, "sdpa")
        ids, mask = padded_batch(head)
        with torch.no_grad():
            reference = eager(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(sdpa(input_ids=ids, attention_mask=mask).logits[mask.bool()], reference[mask.bool()], rtol=0, atol=1e-4)
            alone = eager(input_ids=ids[1][mask[1].bool()][None]).logits[0]
            torch.testing.assert_close(reference[1][mask[1].bool()], alone, rtol=0, atol=1e-4)
            # The position signal matters: a model without it gives other logits.
            plain = build(head, tiny_config(config_class, "nope"), "eager")
            plain.load_state_dict(eager.state_dict(), strict=False)
            difference = (plain(input_ids=ids, attention_mask=mask).logits - reference)[mask.bool()].abs().max()
            assert difference > 1e-4, difference
    model = randomised(AutoModelForCausalLM, config)
    ids, mask = padded_batch(AutoModelForCausalLM, lengths=(10, 7))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        prefix = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps, cache = [prefix.logits], prefix.cache
        for t in range(6, ids.shape[1]):
            step = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1)[mask.bool()], full[mask.bool()], rtol=0, atol=1e-4)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % VOCAB
    with torch.no_grad():
        before = mask[:, :7].bool()
        torch.testing.assert_close(model(input_ids=changed, attention_mask=mask).logits[:, :7][before], full[:, :7][before], rtol=0, atol=1e-5)


@pytest.mark.parametrize("encoding", ["cope", "fire"])
def test_randomised_static_cache_generation(encoding):
    config = tiny_config(LLAMA, encoding, eos_token_id=None, fire_threshold=4.0)
    model = randomised(AutoModelForCausalLM, config)
    ids, mask = padded_batch(AutoModelForCausalLM, lengths=(7, 4))
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    static = model.generate(**kwargs, cache_implementation="static")
    torch.testing.assert_close(static, model.generate(**kwargs, use_cache=False), rtol=0, atol=0)


# --- flex and the refusals --------------------------------------------------------------------------------------

FLEX_ENCODINGS = [
    pytest.param(name, marks=[] if name == "fire" else [pytest.mark.slow])
    for name in NEWER
    if "flex_attention" in (POSITION_ENCODINGS[name].backends or ("flex_attention",))
]


@pytest.mark.flex
@pytest.mark.parametrize("encoding", FLEX_ENCODINGS)
def test_flex_matches_eager_with_randomised_positions(encoding):
    # Forward only (flex has no CPU backward); FIRE by default (its score function evaluates an MLP), the rest slow.
    config = tiny_config(LLAMA, encoding, fire_threshold=4.0, fire_mlp_width=4, xpos_scale_base=4.0)
    eager, flex = randomised(AutoModelForCausalLM, config, "eager"), randomised(AutoModelForCausalLM, config, "flex_attention")
    ids, mask = padded_batch(AutoModelForCausalLM)
    with torch.no_grad():
        reference, candidate = eager(input_ids=ids, attention_mask=mask).logits, flex(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(candidate[mask.bool()], reference[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["flex_attention", "flash_attention_2"])
def test_cope_refuses_backends_without_a_row_bias(backend):
    with pytest.raises(ValueError, match=f"attn_implementation='{backend}'.*position_encoding='cope'.*'eager', 'sdpa'"):
        tiny_config(LLAMA, "cope", attn_implementation=backend)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(position_encoding="kerple", kerple_variant="cubic"), "kerple_variant"),
        (dict(position_encoding="dynamic_bias", dynamic_bias_layers=0), "dynamic_bias_layers"),
        (dict(position_encoding="fire", fire_threshold=0.0), "fire_threshold"),
        (dict(position_encoding="fire", fire_mlp_width=0), "fire_mlp_width"),
        (dict(position_encoding="xpos", xpos_scale_base=-1.0), "xpos_scale_base"),
        (dict(position_encoding="cope", cope_max_positions=1), "cope_max_positions"),
        (dict(position_encoding="xpos", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
        (dict(position_encoding="xpos", hidden_size=36, num_attention_heads=4, num_key_value_heads=4), "head_dim"),
    ],
)
def test_bad_hyperparameters_name_their_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        PosVarLlamaConfig(**{**dict(hidden_size=32, num_attention_heads=4), **overrides})


def test_an_unused_encodings_fields_are_not_checked():
    PosVarLlamaConfig(position_encoding="rope", kerple_variant="cubic", hidden_size=32, num_attention_heads=4)
