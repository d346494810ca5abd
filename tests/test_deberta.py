"""posvar_deberta: parity with transformers' DebertaV2, backends, the Enhanced Mask Decoder, errors, training."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorForLanguageModeling,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DebertaV2Model,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

from conftest import VOCAB, build, tiny_config
from hf_posvariants import PosVarDebertaConfig, disentangled_attention
from hf_posvariants.conversion import convert_deberta
from hf_posvariants.disentangled_attention import DisentangledAttention, DisentangledAttentionCore
from hf_posvariants.position_encodings import Positions, deberta_log_bucket, distance_grid

LENGTH = 24  # longer than 2 × max_relative_positions below, so clipping and buckets are exercised


def deberta_config(**overrides) -> PosVarDebertaConfig:
    fields = dict(num_key_value_heads=4, position_encoding="nope", position_buckets=8, max_relative_positions=-1)
    fields.update(overrides)
    return tiny_config(PosVarDebertaConfig, **fields)


def batch(length: int = LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences, the second right-padded after 15 tokens."""
    input_ids = torch.randint(3, VOCAB, (2, length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0
    input_ids[1, 15:] = 0
    return input_ids, attention_mask


def reference_config(pos_att_type, share_att_key, position_buckets, **overrides) -> DebertaV2Config:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        relative_attention=True,
        pos_att_type=pos_att_type,
        share_att_key=share_att_key,
        position_buckets=position_buckets,
        max_relative_positions=8 if position_buckets < 0 else -1,
        norm_rel_ebd="layer_norm",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    fields.update(overrides)
    return DebertaV2Config(**fields)


def assert_matches_reference(ours, reference, padded: bool = True) -> None:
    """Same logits (or hidden states) within 1e-4 on real tokens: padded query rows are meaningless, and
    transformers masks them as queries too."""
    input_ids, attention_mask = batch()
    if not padded:
        input_ids, attention_mask = input_ids.clamp(min=3), None
    with torch.no_grad():
        expected = first_output(reference(input_ids, attention_mask=attention_mask))
        result = first_output(ours(input_ids, attention_mask=attention_mask))
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    torch.testing.assert_close(result[real], expected[real], atol=1e-4, rtol=0)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values everywhere (init leaves biases at 0 and norms at 1, which hides misplaced weights)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("pos_att_type", [["c2p"], ["p2c"], ["c2p", "p2c"]])
@pytest.mark.parametrize("share_att_key", [True, False])
@pytest.mark.parametrize("position_buckets", [-1, 8])
def test_masked_lm_matches_transformers_debertav2(pos_att_type, share_att_key, position_buckets):
    # Both head layouts and both input-position settings are covered across the grid.
    legacy = position_biased_input = share_att_key
    config = reference_config(
        pos_att_type, share_att_key, position_buckets, legacy=legacy, position_biased_input=position_biased_input
    )
    reference = randomise(DebertaV2ForMaskedLM(config))
    ours = convert_deberta(reference).eval()
    assert ours.config.emd_layers == 0
    for backend in ("eager", "sdpa"):
        ours.set_attn_implementation(backend)
        assert_matches_reference(ours, reference, padded=True)
        assert_matches_reference(ours, reference, padded=False)


def test_base_model_matches_transformers_debertav2_model():
    reference = randomise(DebertaV2Model(reference_config(["c2p", "p2c"], False, 8)))
    assert_matches_reference(convert_deberta(reference).eval(), reference)


def test_log_bucket_matches_reference():
    relative = torch.arange(-300, 301)[None, :]
    for buckets, max_position in ((8, 64), (256, 512)):
        expected = make_log_bucket_position(relative, buckets, max_position).long()
        assert torch.equal(deberta_log_bucket(relative, buckets, max_position), expected)
    # No room for log buckets (buckets // 2 >= max_position - 1): DebertaV2's formula divides by log(1) = 0;
    # within the span it returns exact distances, and so do we, everywhere, leaving the bound to the clamp.
    within = torch.arange(-16, 17)
    assert torch.equal(deberta_log_bucket(within, 32, 17), make_log_bucket_position(within, 32, 17).long())
    assert torch.equal(deberta_log_bucket(relative, 32, 17), relative)


@pytest.mark.parametrize("max_position_embeddings", [64, 128])
def test_buckets_beyond_the_span_build_and_match_transformers(max_position_embeddings):
    # DeBERTa-v3's 256 buckets with a short span: every distance within the span stays exact, as in DebertaV2.
    within = torch.arange(-(max_position_embeddings - 1), max_position_embeddings)
    expected = make_log_bucket_position(within, 256, max_position_embeddings).long()
    assert torch.equal(deberta_log_bucket(within, 256, max_position_embeddings), expected)
    assert PosVarDebertaConfig(max_position_embeddings=max_position_embeddings).position_buckets == 256
    config = reference_config(["c2p", "p2c"], True, 256, max_position_embeddings=max_position_embeddings)
    reference = randomise(DebertaV2ForMaskedLM(config))
    assert_matches_reference(convert_deberta(reference).eval(), reference)


CONFIGS = {
    "both-shared-buckets": dict(),
    "c2p-separate-clipped": dict(pos_att_type="c2p", share_att_key=False, position_buckets=-1, max_relative_positions=6),
    "p2c-learned-positions": dict(pos_att_type="p2c", position_encoding="learned", norm_rel_ebd="none"),
    "pre-norm": dict(norm_position="pre"),
}
HEADS = (AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification)


def first_output(outputs) -> torch.Tensor:
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs.logits


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.__name__)
def test_eager_matches_sdpa(overrides, head):
    config = deberta_config(**overrides)
    eager, sdpa = build(head, config, "eager"), build(head, config, "sdpa")
    input_ids, attention_mask = batch()
    with torch.no_grad():
        expected = first_output(eager(input_ids, attention_mask=attention_mask))
        result = first_output(sdpa(input_ids, attention_mask=attention_mask))
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_rows", [None, (3,)], ids=["default-layouts", "blocks-of-3"])
def test_eager_matches_sdpa_gradients(monkeypatch, block_rows):
    """SDPA trains through `DisentangledAttentionCore` on CPU; its gradients are eager's, with the term layouts the
    cost model picks or in blocks of three rows."""
    if block_rows is not None:
        monkeypatch.setattr(disentangled_attention, "BLOCK_ROWS", block_rows)
        monkeypatch.setattr(disentangled_attention, "BLOCK_CALL_PRODUCTS", 0)
    disentangled_attention.distance_layouts.cache_clear()
    layouts, layouts_of = [], disentangled_attention.distance_layouts
    monkeypatch.setattr(disentangled_attention, "distance_layouts",
                        lambda *key: layouts.append(layouts_of(*key)) or layouts[-1])
    config = deberta_config(hidden_dropout=0.0)
    input_ids, attention_mask = batch()
    core_calls = []
    core_forward = DisentangledAttentionCore.forward
    monkeypatch.setattr(DisentangledAttentionCore, "forward", lambda *a: core_calls.append(1) or core_forward(*a))
    gradients = []
    for backend in ("eager", "sdpa"):
        model = build(AutoModelForMaskedLM, config, backend)
        model(input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
        assert len(core_calls) == (config.num_hidden_layers + config.emd_layers if backend == "sdpa" else 0)
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert len(layouts) == config.num_hidden_layers + config.emd_layers
    assert all((len(layout.blocks) > 1) == (block_rows is not None) for pair in layouts for layout in pair)
    assert gradients[0].keys() == gradients[1].keys()
    assert "model.relative_positions.embeddings.weight" in gradients[0]
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-5, rtol=0, msg=name)


def reference_core(query, key, value, pos_key, pos_query, index, mask, scaling, dropout):
    """The disentangled core as the unfused path computes it: c2p/p2c by broadcast products, the gathered bias,
    then eager's masked softmax (a boolean mask filled, an additive one added)."""
    c2p = None if pos_key is None else torch.matmul(query, pos_key.transpose(-1, -2))
    p2c = None if pos_query is None else torch.matmul(key, pos_query.transpose(-1, -2))
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling + DisentangledAttention.gathered_bias(c2p, p2c, index)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    weights = torch.nn.functional.dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(weights, value)


def fused_core(query, key, value, pos_key, pos_query, index, mask, scaling, dropout):
    """`DisentangledAttentionCore` with the term layouts it computes itself."""
    return DisentangledAttentionCore.apply(query, key, value, pos_key, pos_query, index, None, mask, scaling, dropout)


@pytest.mark.parametrize("terms", [("c2p",), ("p2c",), ("c2p", "p2c")])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("chunk_heads", [3, 2], ids=["one-chunk", "chunks-of-2-and-1"])
@pytest.mark.parametrize("block_rows", [None, (3,)], ids=["one-block", "blocks-of-3"])
def test_fused_core_matches_unfused_values_and_gradients(monkeypatch, terms, mask_kind, chunk_heads, block_rows):
    """Output and every input gradient of `DisentangledAttentionCore` equal the unfused computation's, with log
    buckets, a query length unlike the key length, and a fully masked query row (uniform weights, whose slots
    get no gradient from a boolean mask); all heads of a batch item at once, or in chunks of two and one; each term's
    products in one block, or in blocks of three rows (the last one short) over the columns they read. The
    output is laid out (B, Q, H, D) in memory, as the output projection reads it."""
    torch.manual_seed(0)
    batch_size, heads, query_length, key_length, dim, span = 2, 3, 7, 9, 5, 4
    monkeypatch.setattr(disentangled_attention, "CHUNK_SCORE_BYTES", chunk_heads * query_length * key_length * 4)
    if block_rows is not None:  # blocks whenever they save a product
        monkeypatch.setattr(disentangled_attention, "BLOCK_ROWS", block_rows)
        monkeypatch.setattr(disentangled_attention, "BLOCK_CALL_PRODUCTS", 0)
    inputs = [torch.randn(batch_size, heads, length, dim) for length in (query_length, key_length, key_length)]
    inputs += [torch.randn(heads, 2 * span, dim) if term in terms else None for term in POSITION_TERM_NAMES]
    leaves = [None if tensor is None else tensor.requires_grad_() for tensor in inputs]
    relative = -(torch.arange(query_length + key_length - 1) - (query_length - 1))
    by_distance = (deberta_log_bucket(relative, span, 8) + span).clamp(0, 2 * span - 1)
    index = by_distance[distance_grid(query_length, key_length, "cpu")]
    mask = None
    if mask_kind is not None:
        allowed = torch.rand(batch_size, 1, query_length, key_length) > 0.3
        allowed[1, 0, 2] = False  # a query that sees no key
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, -1e4)
    grad_output = torch.randn(batch_size, heads, query_length, dim)
    results = []
    if block_rows is not None:
        assert all(len(layout.blocks) == 3 for layout in disentangled_attention.term_layouts(index))
    for core in (reference_core, fused_core):
        output = core(*leaves, index, mask, 0.3, 0.0)
        gradients = torch.autograd.grad(output, [leaf for leaf in leaves if leaf is not None], grad_output)
        results.append((output, gradients))
    (expected, expected_gradients), (result, result_gradients) = results
    assert result.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(result_gradients, expected_gradients):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


POSITION_TERM_NAMES = ("c2p", "p2c")


@pytest.mark.parametrize("block_rows", [(), (4,), (3, 5)], ids=["one-block", "blocks-of-4", "cheapest-of-3-and-5"])
def test_term_layouts_read_every_pair_at_its_product(monkeypatch, block_rows):
    """Products packed as a term's layout says, read at its entries, give product[row, δ(i, j)] at every pair (row i
    for c2p, key j for p2c), with one block of all rows or several, each over only the columns its rows read."""
    monkeypatch.setattr(disentangled_attention, "BLOCK_ROWS", block_rows)
    monkeypatch.setattr(disentangled_attention, "BLOCK_CALL_PRODUCTS", 0)
    query_length, key_length, span = 10, 13, 6
    relative = -(torch.arange(query_length + key_length - 1) - (query_length - 1))
    by_distance = (deberta_log_bucket(relative, span, 16) + span).clamp(0, 2 * span - 1)
    index = by_distance[distance_grid(query_length, key_length, "cpu")]
    queries, keys = torch.arange(query_length)[:, None], torch.arange(key_length)[None, :]
    for side, layout in enumerate(disentangled_attention.term_layouts(index)):
        products = torch.randn(index.shape[side], 2 * span)
        packed = torch.cat([products[rows, columns].flatten() for rows, columns, _ in layout.offsets()])
        assert packed.numel() == layout.size <= products.numel()
        assert (len(layout.blocks) > 1) == bool(block_rows)
        expected = products[queries if side == 0 else keys, index]
        torch.testing.assert_close(packed[layout.entries(index)].view_as(index), expected, rtol=0, atol=0)


def test_gradient_checkpointing_with_attention_dropout_gives_the_same_gradients():
    """Reentrant checkpointing runs each block under no_grad, then again with gradients: both runs take the fused core
    on CPU SDPA, so they draw the same attention dropout."""
    config = deberta_config(attention_dropout=0.2)
    input_ids, attention_mask = batch()
    gradients = []
    for checkpointing in (None, {"use_reentrant": True}, {"use_reentrant": False}):
        model = build(AutoModelForMaskedLM, config, "sdpa").train()
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        torch.manual_seed(5)
        model(input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    for candidate in gradients[1:]:
        for name, gradient in gradients[0].items():
            torch.testing.assert_close(candidate[name], gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_fused_core_attention_dropout_gradients():
    """With attention dropout, the core's backward is the derivative of its forward (gradcheck in float64, the same
    draws each call), it drops weights (outputs differ from p=0's), and it matches the unfused computation given
    the same draws: torch's dropout draws its mask the same way, on the (B, H, Q, K) weights."""
    torch.manual_seed(0)
    heads, length, dim, span = 2, 5, 3, 3
    states = [torch.randn(2, heads, length, dim, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    rows = [torch.randn(heads, 2 * span, dim, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    relative = -(torch.arange(2 * length - 1) - (length - 1))
    index = ((relative + span).clamp(0, 2 * span - 1))[distance_grid(length, length, "cpu")]

    def run(*leaves, dropout=0.4):
        torch.manual_seed(1)
        return fused_core(*leaves, index, None, 0.5, dropout)

    assert torch.autograd.gradcheck(run, (*states, *rows))
    assert not torch.allclose(run(*states, *rows), run(*states, *rows, dropout=0.0))
    result = run(*states, *rows)
    torch.manual_seed(1)
    torch.testing.assert_close(result, reference_core(*states, *rows, index, None, 0.5, 0.4))


@pytest.mark.slow  # its inductor compile failed once after other flex compiles in the same process
@pytest.mark.flex
@pytest.mark.parametrize("schedule", [None, ["nope", "alibi"]], ids=["position-terms", "with-scheduled-alibi"])
def test_flex_matches_eager(schedule):
    """Flex takes DeBERTa's position terms as a score function, and a scheduled layer's shared bias with them."""
    config = deberta_config(layer_position_encodings=schedule)
    input_ids, attention_mask = batch(length=32)
    eager, flex = build(AutoModelForMaskedLM, config, "eager"), build(AutoModelForMaskedLM, config, "flex_attention")
    with torch.no_grad():
        expected = eager(input_ids, attention_mask=attention_mask).logits
        result = flex(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)


def test_position_terms_change_scores():
    """Positions matter: permuting tokens changes the outputs, unlike c2c-only attention without positions."""
    input_ids, _ = batch()
    permuted = input_ids.flip(-1)
    for overrides, position_sensitive in ((dict(), True), (dict(relative_attention=False), False)):
        model = build(AutoModel, deberta_config(**overrides))
        with torch.no_grad():
            straight = model(input_ids).last_hidden_state
            flipped = model(permuted).last_hidden_state.flip(1)
        assert torch.allclose(straight, flipped, atol=1e-5) != position_sensitive


def test_save_load_round_trip(tmp_path):
    for head in HEADS:
        model = build(head, deberta_config())
        model.save_pretrained(tmp_path / head.__name__)
        loaded = head.from_pretrained(tmp_path / head.__name__, attn_implementation="eager").eval()
        assert type(loaded) is type(model)
        input_ids, attention_mask = batch()
        with torch.no_grad():
            expected = first_output(model(input_ids, attention_mask=attention_mask))
            torch.testing.assert_close(first_output(loaded(input_ids, attention_mask=attention_mask)), expected)
    assert loaded.config.pos_att_type == ["c2p", "p2c"]


def test_enhanced_mask_decoder_changes_only_the_head():
    with_emd = build(AutoModelForMaskedLM, deberta_config(emd_layers=2))
    without = AutoModelForMaskedLM.from_config(copy.deepcopy(deberta_config(emd_layers=0)), attn_implementation="eager")
    missing, unexpected = without.load_state_dict(with_emd.state_dict(), strict=False)
    assert unexpected == ["emd.position_embeddings.weight"] and not missing
    without.eval()
    input_ids, attention_mask = batch()
    with torch.no_grad():
        encoder_with = with_emd.model(input_ids, attention_mask=attention_mask)
        encoder_without = without.model(input_ids, attention_mask=attention_mask)
        assert torch.equal(encoder_with.last_hidden_state, encoder_without.last_hidden_state)
        logits_with = with_emd(input_ids, attention_mask=attention_mask).logits
        logits_without = without(input_ids, attention_mask=attention_mask).logits
        assert not torch.allclose(logits_with, logits_without, atol=1e-3)
        torch.testing.assert_close(logits_without, without.lm_head(without.transform(encoder_without.last_hidden_state)))

        # The decoder by definition: the last (post-norm) layer twice, its queries starting at the layer's input
        # plus absolute positions, its keys and values that input.
        model = with_emd.model
        last_layer = model.layers[-1]
        kv = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-2]
        mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        slots = torch.arange(input_ids.shape[1])
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        layer_positions, _ = model.compute_positions(kv, positions, slots, slots, None)
        query = kv + with_emd.emd.position_embeddings(positions)
        for _ in range(2):
            attended = last_layer.self_attn(query, mask, layer_positions, key_value_states=kv)[0]
            query = last_layer.input_layernorm(query + attended)
            query = last_layer.post_attention_layernorm(query + last_layer.mlp(query))
        torch.testing.assert_close(logits_with, with_emd.lm_head(with_emd.transform(query)))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_relative_table_on_the_cpu_holds_only_the_rows_pairs_read(monkeypatch, backend):
    """On the CPU the layers get only the relative rows some pair reads (15 of 32 at 8 tokens within the buckets'
    exact span), and compute what the whole table gives (as on an accelerator), values and gradients."""
    config = deberta_config(position_buckets=16, max_relative_positions=64, hidden_dropout=0.0, emd_layers=1)
    input_ids, attention_mask = batch(length=8)
    slots = torch.arange(8)
    results = []
    for trimmed in (True, False):
        model = build(AutoModelForMaskedLM, config, backend)
        encoding = model.model.relative_positions
        monkeypatch.setattr(encoding, "keeps_rows_read_only", lambda device, trimmed=trimmed: trimmed)
        table, by_distance = encoding.relative_positions(slots, slots)
        assert (table.shape[0], int(by_distance.min()), int(by_distance.max())) == ((15, 0, 14) if trimmed else (32, 9, 23))
        output = model(input_ids, attention_mask=attention_mask, labels=input_ids)
        output.loss.backward()
        results.append((output.logits, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (logits, gradients), (whole_logits, whole_gradients) = results
    torch.testing.assert_close(logits, whole_logits, atol=1e-6, rtol=0)
    for name, gradient in whole_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, atol=1e-6, rtol=0, msg=name)


def test_enhanced_mask_decoder_uses_the_last_layers_scheduled_encoding():
    """With a per-layer schedule the decoder re-runs the last layer with that layer's encoding (ALiBi here), not the
    model's input encoding."""
    config = deberta_config(layer_position_encodings=["nope", "alibi"], emd_layers=1)
    model = build(AutoModelForMaskedLM, config)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        encoder = model.model
        kv = encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-2]
        slots = torch.arange(input_ids.shape[1])
        padding = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        alibi = encoder.encoding_named("alibi").attention_bias(slots, slots)  # (1, H, Q, K)
        positions = Positions(relative=encoder.relative_positions.relative_positions(slots, slots))
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        query = model.emd(kv, position_ids)
        states = encoder.layers[-1].run(query, padding + alibi, positions, None, kv)
        expected = model.lm_head(model.transform(encoder.norm(states)))
        torch.testing.assert_close(model(input_ids, attention_mask=attention_mask).logits, expected)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(pos_att_type=["c2p", "p2p"]), "pos_att_type"),
        (dict(pos_att_type="c2p|bogus"), "pos_att_type"),
        (dict(position_buckets=1), "position_buckets"),
        (dict(max_relative_positions=0), "max_relative_positions"),
        (dict(norm_rel_ebd="batch_norm"), "norm_rel_ebd"),
        (dict(position_encoding="rope"), "position_encoding"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(emd_layers=-1), "emd_layers"),
        (dict(attention_variant="differential"), "attention_variant"),
    ],
)
def test_impossible_settings_are_refused(overrides, field):
    # The config runs its checks itself, so users see a plain ValueError naming the field.
    with pytest.raises(ValueError, match=field):
        deberta_config(**overrides)


def test_flash_backend_is_refused():
    with pytest.raises(ValueError, match="flash_attention_2"):
        deberta_config().check_attention_backend("flash_attention_2")
    deberta_config(relative_attention=False).check_attention_backend("flash_attention_2")


def test_decoder_setting_is_refused():
    with pytest.raises(ValueError, match="is_decoder"):
        build(AutoModel, deberta_config(is_decoder=True))


def character_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    symbols = ["[PAD]", "[UNK]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz ")
    tokenizer = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")


def test_trains_with_trainer_and_mlm_collator(tmp_path):
    tokenizer = character_tokenizer()
    texts = ["war and peace", "the quick brown fox jumps", "over the lazy dog", "a tale of two cities"] * 2
    dataset = [{"input_ids": tokenizer(text)["input_ids"]} for text in texts]
    model = AutoModelForMaskedLM.from_config(deberta_config(vocab_size=len(tokenizer), pad_token_id=0))
    before = model.model.relative_positions.embeddings.weight.detach().clone()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.3)
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to="none",
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.model.relative_positions.embeddings.weight)


def test_convert_script_round_trip(tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    reference = randomise(DebertaV2ForMaskedLM(reference_config(["c2p", "p2c"], True, 8)))
    reference.save_pretrained(tmp_path / "deberta")
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_deberta.py"
    monkeypatch.setattr("sys.argv", ["convert_deberta.py", str(tmp_path / "deberta"), str(tmp_path / "posvar")])
    with pytest.raises(SystemExit) as exit_code:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_code.value.code == 0
    assert_matches_reference(AutoModelForMaskedLM.from_pretrained(tmp_path / "posvar").eval(), reference)


@pytest.mark.slow
def test_loads_as_remote_code_without_the_package(tmp_path):
    import subprocess
    import sys

    model = build(AutoModelForMaskedLM, deberta_config(emd_layers=1))
    model.save_pretrained(tmp_path)
    input_ids, attention_mask = batch()
    torch.save((input_ids, attention_mask), tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(model(input_ids, attention_mask=attention_mask).logits, tmp_path / "expected.pt")
    # A fresh process where importing the package fails: only the checkpoint's own files may be used.
    script = f"""
import sys, torch
sys.modules["hf_posvariants"] = None
from transformers import AutoModelForMaskedLM
model = AutoModelForMaskedLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True, attn_implementation="eager").eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
input_ids, attention_mask = torch.load({str(tmp_path / "batch.pt")!r})
with torch.no_grad():
    logits = model(input_ids, attention_mask=attention_mask).logits
torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
