"""Per-layer position schedules (`layer_position_encodings`): validation, save/load, each distinct encoding
computed once per forward, every layer handed its own `Positions`, and the contract checks on mixed schedules."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_CONFIGS, VOCAB, build, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from test_newer_encodings import padded_batch, randomise_positions

LLAMA = FAMILY_CONFIGS[1]
# (position_encoding, schedule, layers): Llama 4's three RoPE layers in four; ALiBi in the lower layers only, over
# sinusoidal embeddings; and one of every per-layer kind (bias, contextual, rotary with decay, none).
SCHEDULES = [
    ("rope", ["rope", "rope", "rope", "nope"], 4),
    ("sinusoidal", ["alibi", "alibi", "nope", "nope"], 4),
    ("nope", ["t5_bias", "cope", "xpos", "fire"], 4),
]
SCHEDULE_IDS = ["llama4", "alibi-lower", "mixed-kinds"]


def schedule_config(case, config_class=LLAMA, **overrides):
    main, schedule, layers = case
    return tiny_config(config_class, main, layer_position_encodings=schedule, num_hidden_layers=layers, **overrides)


def schedules():
    return pytest.mark.parametrize("case", SCHEDULES, ids=SCHEDULE_IDS)


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=lambda c: c.model_type)
@schedules()
def test_schedule_trains_and_round_trips(tmp_path, config_class, case):
    config = schedule_config(case, config_class)
    for head in (AutoModelForCausalLM, AutoModelForMaskedLM):
        model = build(head, config).train()
        ids = torch.randint(3, VOCAB, (2, 10))
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.eval().save_pretrained(tmp_path / head.__name__)
        loaded = head.from_pretrained(tmp_path / head.__name__, attn_implementation="eager").eval()
        assert loaded.config.layer_position_encodings == case[1]
        assert AutoConfig.from_pretrained(tmp_path / head.__name__).layer_position_encodings == case[1]
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=lambda c: c.model_type)
@schedules()
def test_schedule_eager_sdpa_padding_causality_and_cache(config_class, case):
    config = schedule_config(case, config_class, eos_token_id=None, fire_threshold=4.0, xpos_scale_base=4.0)
    for head in (AutoModelForCausalLM, AutoModelForMaskedLM):
        eager, sdpa = build(head, config, "eager"), build(head, config, "sdpa")
        randomise_positions(eager), randomise_positions(sdpa)
        ids, mask = padded_batch(head)
        with torch.no_grad():
            reference = eager(input_ids=ids, attention_mask=mask).logits
            candidate = sdpa(input_ids=ids, attention_mask=mask).logits
            alone = sdpa(input_ids=ids[1][mask[1].bool()][None]).logits[0]
        torch.testing.assert_close(candidate[mask.bool()], reference[mask.bool()], rtol=0, atol=1e-5)
        torch.testing.assert_close(candidate[1][mask[1].bool()], alone, rtol=0, atol=1e-5)
    model = build(AutoModelForCausalLM, config, "sdpa")
    randomise_positions(model)
    ids = torch.randint(3, VOCAB, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 5) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=changed).logits[:, :7], model(input_ids=ids).logits[:, :7], rtol=0, atol=1e-6)
    ids, mask = padded_batch(AutoModelForCausalLM, lengths=(7, 4))
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(model.generate(**kwargs), model.generate(**kwargs, use_cache=False), rtol=0, atol=0)


@pytest.mark.flex
def test_schedule_on_flex_matches_eager():
    config = schedule_config(("rope", ["rope", "alibi"], 2))
    eager, flex = build(AutoModelForCausalLM, config, "eager"), build(AutoModelForCausalLM, config, "flex_attention")
    ids, mask = padded_batch(AutoModelForCausalLM)
    with torch.no_grad():
        reference, candidate = eager(input_ids=ids, attention_mask=mask).logits, flex(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(candidate[mask.bool()], reference[mask.bool()], rtol=0, atol=1e-5)


def test_each_encoding_is_computed_once_and_every_layer_gets_its_own():
    config = schedule_config(("rope", ["rope", "rope", "rope", "nope"], 8))
    model = build(AutoModel, config, "sdpa")
    calls, seen = [], []
    rotary = model.position_encoding.rotary_embeddings
    model.position_encoding.rotary_embeddings = lambda *args: calls.append(1) or rotary(*args)
    for layer in model.layers:  # the attention sublayer receives the block's Positions
        layer.self_attn.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    model(input_ids=torch.randint(3, VOCAB, (2, 6)))
    assert len(calls) == 1
    assert [positions.rotary is not None for positions in seen] == [True, True, True, False] * 2
    assert seen[0].rotary[0] is seen[1].rotary[0]  # one value shared by the layers of one encoding


def test_lower_layer_bias_rides_only_in_its_layers_mask():
    model = build(AutoModel, schedule_config(("sinusoidal", ["t5_bias", "nope"], 2)), "sdpa")
    masks = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda module, args: masks.append(args[1]))
    model(input_ids=torch.randint(3, VOCAB, (1, 5)))
    assert masks[0].shape == (1, 4, 5, 5) and masks[1] is None  # T5 folded in layer 0; layer 1 is plain causal
    assert list(model.scheduled_encodings) == ["t5_bias", "nope"]


def test_a_one_entry_schedule_is_the_plain_model():
    ids = torch.randint(3, VOCAB, (2, 7))
    plain = build(AutoModelForCausalLM, tiny_config(LLAMA, "alibi"))
    scheduled = build(AutoModelForCausalLM, tiny_config(LLAMA, "alibi", layer_position_encodings=["alibi"]))
    assert plain.state_dict().keys() == scheduled.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(scheduled(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("main", "schedule", "message"),
    [
        ("nope", ["rope", "learned"], "allowed entries"),
        ("nope", ["rope", "unknown"], "allowed entries"),
        ("nope", [], "non-empty"),
        ("nope", ["rope", "nope", "rope"], "must divide num_hidden_layers=2"),
        ("alibi", ["rope", "nope"], "position_encoding='alibi' is not in layer_position_encodings"),
    ],
)
def test_bad_schedules_are_refused(main, schedule, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(LLAMA, main, layer_position_encodings=schedule)


@pytest.mark.parametrize(("schedule", "backend"), [(["alibi", "nope"], "flash_attention_2"), (["rope", "cope"], "flex_attention")])
def test_backends_are_checked_for_every_scheduled_encoding(schedule, backend):
    refused = schedule[0] if backend.startswith("flash") else schedule[1]
    with pytest.raises(ValueError, match=f"layer_position_encodings='{refused}'"):
        tiny_config(LLAMA, "nope" if "rope" not in schedule else "rope", layer_position_encodings=schedule,
                    attn_implementation=backend)


def test_scheduled_hyperparameters_are_validated():
    with pytest.raises(ValueError, match="kerple_variant"):
        tiny_config(LLAMA, "rope", layer_position_encodings=["rope", "kerple"], kerple_variant="cubic")
