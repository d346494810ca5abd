"""Contract tests: every family × every registered position encoding, so a new encoding is covered by itself."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODINGS, FAMILY_CONFIGS, VOCAB, build, family_with, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from hf_posvariants import POSITION_ENCODINGS, PosVarDebertaConfig
from hf_posvariants.configuration_deberta import INPUT_POSITION_KINDS

LM_HEADS = [AutoModelForCausalLM, AutoModelForMaskedLM]
FAMILY_IDS = [c.model_type for c in FAMILY_CONFIGS]


def family_encoding_grid():
    return pytest.mark.parametrize(
        "config_class,encoding",
        [(c, e) for c in FAMILY_CONFIGS for e in ENCODINGS],
        ids=[f"{c.model_type}-{e}" for c in FAMILY_CONFIGS for e in ENCODINGS],
    )


# posvar_deberta joins with its masked LM and every input encoding it takes (its relative positions are always on).
DEBERTA_ENCODINGS = [e for e in ENCODINGS if POSITION_ENCODINGS[e].kind in INPUT_POSITION_KINDS]
HEAD_CASES = [(c, e, h) for c in FAMILY_CONFIGS for e in ENCODINGS for h in LM_HEADS]
HEAD_CASES += [(PosVarDebertaConfig, e, AutoModelForMaskedLM) for e in DEBERTA_ENCODINGS]


def family_encoding_head_grid():
    """Every family × encoding × language-model head, DeBERTa included."""
    return pytest.mark.parametrize(
        "config_class,encoding,auto_class",
        HEAD_CASES,
        ids=[f"{c.model_type}-{e}-{'clm' if h is AutoModelForCausalLM else 'mlm'}" for c, e, h in HEAD_CASES],
    )


def random_ids(batch: int, length: int, seed: int = 0) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def padded_batch(auto_class, lengths=(9, 6)):
    """Decoders pad on the left (as for generation), encoders on the right."""
    width = max(lengths)
    ids = random_ids(len(lengths), width)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        real = slice(width - length, width) if auto_class is AutoModelForCausalLM else slice(0, length)
        mask[row, real] = 1
    return ids.masked_fill(mask == 0, 0), mask


@family_encoding_head_grid()
def test_train_step_and_save_load_round_trip(tmp_path, config_class, encoding, auto_class):
    model = build(auto_class, tiny_config(config_class, encoding)).train()
    ids = random_ids(2, 10)
    output = model(input_ids=ids, labels=ids)
    assert output.logits.shape == (2, 10, VOCAB)
    assert torch.isfinite(output.loss) and output.loss > 0
    output.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert sum(p.grad.abs().sum() for p in trainable) > 0

    model.eval().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = auto_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is type(model)
    assert AutoConfig.from_pretrained(tmp_path).position_encoding == encoding
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@family_encoding_head_grid()
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_eager_matches_sdpa(config_class, encoding, auto_class, padded):
    config = tiny_config(config_class, encoding)
    eager, sdpa = build(auto_class, config, "eager"), build(auto_class, config, "sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    ids, mask = padded_batch(auto_class) if padded else (random_ids(2, 9), None)
    with torch.no_grad():
        reference, candidate = eager(input_ids=ids, attention_mask=mask).logits, sdpa(input_ids=ids, attention_mask=mask).logits
    real = mask.bool() if padded else slice(None)
    torch.testing.assert_close(candidate[real], reference[real], rtol=0, atol=1e-5)


@pytest.mark.flex
@pytest.mark.parametrize("encoding", ["rope", "alibi", "t5_bias"])
def test_eager_matches_flex_on_padded_decoder(encoding):
    config = tiny_config(family_with(attention_variant="standard", norm_position="pre"), encoding)
    eager, flex = build(AutoModelForCausalLM, config, "eager"), build(AutoModelForCausalLM, config, "flex_attention")
    ids, mask = padded_batch(AutoModelForCausalLM)
    with torch.no_grad():
        reference, candidate = eager(input_ids=ids, attention_mask=mask).logits, flex(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(candidate[mask.bool()], reference[mask.bool()], rtol=0, atol=1e-5)


@family_encoding_grid()
def test_causal_head_never_sees_the_future(config_class, encoding):
    model = build(AutoModelForCausalLM, tiny_config(config_class, encoding), "sdpa")
    ids = random_ids(1, 12)
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 5) % VOCAB
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(after[:, :7], before[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 7:], before[:, 7:])


@family_encoding_grid()
def test_masked_lm_sees_both_directions(config_class, encoding):
    model = build(AutoModelForMaskedLM, tiny_config(config_class, encoding), "sdpa")
    ids = random_ids(1, 12)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 5) % VOCAB
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits[:, 0], model(input_ids=changed).logits[:, 0])


def greedy_by_recomputing(model, ids: torch.LongTensor, mask: torch.LongTensor, steps: int) -> torch.LongTensor:
    """Greedy decoding with no cache: the whole sequence is recomputed at each step."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_token], dim=1), torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return ids


@family_encoding_grid()
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_generate_with_cache_equals_recomputing(config_class, encoding, backend):
    # No end-of-sequence token, so both decodings run the full number of steps.
    model = build(AutoModelForCausalLM, tiny_config(config_class, encoding, eos_token_id=None), backend)
    ids, mask = padded_batch(AutoModelForCausalLM, lengths=(7, 4))
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(generated, greedy_by_recomputing(model, ids, mask, steps=8), rtol=0, atol=0)


@family_encoding_grid()
def test_cached_logits_match_full_forward(config_class, encoding):
    """Step-by-step logits under the cache equal the logits of one full forward, to 1e-5."""
    if not POSITION_ENCODINGS[encoding].cacheable:
        pytest.skip(f"{encoding} declares cacheable=False; generation recomputes (covered above)")
    model = build(AutoModelForCausalLM, tiny_config(config_class, encoding), "sdpa")
    ids, mask = padded_batch(AutoModelForCausalLM, lengths=(10, 7))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        prefix = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        cache, steps = prefix.cache, [prefix.logits]
        for t in range(6, ids.shape[1]):
            step = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental[mask.bool()], full[mask.bool()], rtol=0, atol=1e-5)


@family_encoding_head_grid()
def test_padding_invariance(config_class, encoding, auto_class):
    model = build(auto_class, tiny_config(config_class, encoding), "sdpa")
    ids, mask = padded_batch(auto_class, lengths=(9, 6))
    alone = ids[1][mask[1].bool()].unsqueeze(0)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits[1][mask[1].bool()]
        single = model(input_ids=alone).logits[0]
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=FAMILY_IDS)
def test_base_model_follows_is_decoder(config_class):
    for is_decoder in (True, False):
        model = build(AutoModel, tiny_config(config_class, "rope", is_decoder=is_decoder), "sdpa")
        ids = random_ids(1, 8)
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 3) % VOCAB
        with torch.no_grad():
            first_changed = not torch.allclose(
                model(input_ids=ids).last_hidden_state[:, 0], model(input_ids=changed).last_hidden_state[:, 0]
            )
        assert first_changed == (not is_decoder)


@family_encoding_grid()
def test_generate_with_a_static_cache_equals_recomputing(config_class, encoding):
    """A static cache hands the kernels its whole buffer of keys; position biases must span it too."""
    if not POSITION_ENCODINGS[encoding].cacheable:
        pytest.skip(f"{encoding} declares cacheable=False; generation recomputes (covered above)")
    model = build(AutoModelForCausalLM, tiny_config(config_class, encoding, eos_token_id=None), "sdpa")
    ids, mask = padded_batch(AutoModelForCausalLM, lengths=(7, 4))
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               cache_implementation="static")
    torch.testing.assert_close(generated, greedy_by_recomputing(model, ids, mask, steps=6), rtol=0, atol=0)
