"""generate()'s decoding modes over every cacheable encoding, each against a reference that needs no cache:
sampling, beam search, assisted and prompt-lookup decoding, continuing from a returned cache, a quantized cache,
and padding-free (packed) batches. transformers' source distribution ships no generation tests, so these and
test_contract.py (greedy with dynamic and static caches, left padding), test_compile.py (static cache compiled)
keep the family's generation suite as wide as transformers' own GenerationTesterMixin.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODINGS, VOCAB, build, family_with, tiny_config
from transformers import AutoModelForCausalLM
from transformers.cache_utils import QuantizedCache

from hf_posvariants import PosVarDiffConfig
from hf_posvariants.position_encodings import POSITION_ENCODINGS

LLAMA_LIKE = family_with(attention_variant="standard", norm_position="pre")
CACHEABLE = [name for name in ENCODINGS if POSITION_ENCODINGS[name].cacheable]
# Every cacheable encoding on the standard attention, and differential attention with a rotary and a bias encoding.
CASES = [(LLAMA_LIKE, name) for name in CACHEABLE] + [(PosVarDiffConfig, "rope"), (PosVarDiffConfig, "alibi")]
# The default suite decodes with one encoding of each kind that touches the cache differently (rotary, a fixed and a
# learned bias, differential attention); `-m slow` runs the whole grid.
DEFAULT_CASES = [(LLAMA_LIKE, "rope"), (LLAMA_LIKE, "alibi"), (LLAMA_LIKE, "t5_bias"), (PosVarDiffConfig, "alibi")]
pytestmark = pytest.mark.contract
cacheable_grid = pytest.mark.parametrize(
    "config_class,encoding",
    [pytest.param(*case, marks=() if case in DEFAULT_CASES else pytest.mark.slow) for case in CASES],
    ids=[f"{config_class.model_type}-{name}" for config_class, name in CASES],
)


def causal_lm(config_class, encoding: str, seed: int = 0, **overrides):
    # No end-of-sequence token, so every decoding runs its full number of steps.
    return build(AutoModelForCausalLM, tiny_config(config_class, encoding, eos_token_id=None, **overrides), "sdpa", seed)


def left_padded(lengths=(7, 4), seed: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    ids = torch.randint(3, VOCAB, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, max(lengths) - length :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def generate_with_and_without_cache(model, seed: int = 0, **settings) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The same decoding twice, from the same random state: with the KV cache and recomputing every step."""
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(seed)
        outputs.append(model.generate(**settings, use_cache=use_cache, pad_token_id=0))
    return outputs[0], outputs[1]


@cacheable_grid
def test_sampling_with_the_cache_draws_what_recomputing_draws(config_class, encoding):
    model = causal_lm(config_class, encoding)
    ids, mask = left_padded()
    cached, recomputed = generate_with_and_without_cache(
        model, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.7
    )
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=0)


@cacheable_grid
def test_beam_search_with_the_cache_equals_recomputing(config_class, encoding):
    model = causal_lm(config_class, encoding)
    ids, mask = left_padded()
    cached, recomputed = generate_with_and_without_cache(
        model, input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False
    )
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=0)


def repetitive_prompt(length: int = 12) -> torch.LongTensor:
    """A prompt that repeats itself, so prompt lookup finds n-grams to propose."""
    pattern = torch.randint(3, VOCAB, (4,), generator=torch.Generator().manual_seed(3))
    return pattern.repeat(length // 4 + 1)[:length].unsqueeze(0)


@cacheable_grid
def test_assisted_decoding_gives_the_main_models_greedy_tokens(config_class, encoding):
    """The assistant (other weights, so some of its drafts are rejected) changes the speed, never the tokens."""
    model, assistant = causal_lm(config_class, encoding), causal_lm(config_class, encoding, seed=1, num_hidden_layers=1)
    settings = dict(input_ids=repetitive_prompt(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    greedy = model.generate(**settings)
    torch.testing.assert_close(model.generate(**settings, assistant_model=assistant), greedy, rtol=0, atol=0)


@cacheable_grid
def test_prompt_lookup_decoding_gives_the_greedy_tokens(config_class, encoding):
    model = causal_lm(config_class, encoding)
    settings = dict(input_ids=repetitive_prompt(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    greedy = model.generate(**settings)
    torch.testing.assert_close(model.generate(**settings, prompt_lookup_num_tokens=3), greedy, rtol=0, atol=0)


@cacheable_grid
def test_generation_continues_from_a_returned_cache(config_class, encoding):
    """Three tokens, then three more from the returned cache, give the six tokens of one call."""
    model = causal_lm(config_class, encoding)
    ids, mask = left_padded()
    settings = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    whole = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **settings).sequences
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **settings)
    grown = torch.cat([mask, torch.ones_like(first.sequences[:, ids.shape[1] :])], dim=1)
    second = model.generate(input_ids=first.sequences, attention_mask=grown, cache=first.cache, max_new_tokens=3, **settings)
    assert first.cache.get_seq_length() >= first.sequences.shape[1] - 1
    torch.testing.assert_close(second.sequences, whole, rtol=0, atol=0)


@cacheable_grid
def test_quantized_cache_keeps_the_logits_within_fp8_rounding(config_class, encoding):
    """transformers' QuantizedCache with its dependency-free fp8 backend: the same steps' logits as the full-precision
    cache to within what 8-bit keys and values allow, and the prefill's exactly (it reads unquantized states)."""
    model = causal_lm(config_class, encoding)
    ids, mask = left_padded()
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                    return_dict_in_generate=True, output_logits=True)
    full = model.generate(**settings)
    quantized = model.generate(**settings, cache_implementation="quantized", cache_config={"backend": "fp8"})
    assert isinstance(quantized.cache, QuantizedCache)
    torch.testing.assert_close(quantized.logits[0], full.logits[0], rtol=0, atol=1e-5)
    # Teacher-forced on the full-precision tokens, so a near tie cannot send the two decodings apart.
    with torch.no_grad():
        prefix = model(input_ids=ids, attention_mask=mask, use_cache=True,
                       cache=QuantizedCache(backend="fp8", config=model.config))
        cache, steps_mask = prefix.cache, mask
        for step, token in enumerate(full.sequences[:, ids.shape[1] : -1].T):
            steps_mask = torch.cat([steps_mask, torch.ones_like(token[:, None])], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=steps_mask, cache=cache, use_cache=True).logits[:, -1]
            scale = full.logits[step + 1].abs().amax()
            torch.testing.assert_close(logits, full.logits[step + 1], rtol=0, atol=0.1 * scale.item())


def packed_and_padded(lengths=(6, 4, 3), seed: int = 0):
    """The same sequences as one padding-free row (position_ids restarting at each) and as a right-padded batch."""
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(3, VOCAB, (length,), generator=generator) for length in lengths]
    packed = torch.cat(sequences).unsqueeze(0)
    position_ids = torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0)
    padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    return packed, position_ids, padded, mask


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_padding_free_batch_gives_the_padded_batchs_logits(encoding):
    """A padding-free training batch (sequences packed into one row, position_ids restarting, no attention mask nor
    cache, so transformers masks each sequence off) as a
    padded one: every encoding reads each sequence's own positions and length (normalized_index divides by it)."""
    model = causal_lm(LLAMA_LIKE, encoding)
    packed, position_ids, padded, mask = packed_and_padded()
    with torch.no_grad():
        from_packed = model(input_ids=packed, position_ids=position_ids, use_cache=False).logits[0]
        from_padded = model(input_ids=padded, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(from_packed, from_padded, rtol=0, atol=1e-5)
