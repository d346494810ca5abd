"""transformers' continuous batching (`generate_batch`, which `transformers serve --continuous_batching` runs): every
request packed into one row over a paged KV cache. Encodings read from `position_ids` give `generate()`'s tokens;
the rest are refused before a request is queued, naming the encoding."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

from hf_posvariants import PosVarLlamaConfig
from hf_posvariants.position_encodings import POSITION_ENCODINGS

from conftest import ENCODINGS, FAMILY_CONFIGS, build, tiny_config

PROMPTS = [[5, 7, 9, 11], [3, 4], [10, 11, 12, 13, 14, 15, 16]]
GREEDY = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
# Small pages and batches: the prompts are prefilled over several steps, so later steps read earlier keys from pages.
PAGED = ContinuousBatchingConfig(page_size=16, num_blocks=16, max_batch_tokens=8)


def runs_on_paged_cache(encoding: str) -> bool:
    return POSITION_ENCODINGS[encoding].reads_position_ids_only()


def generate_each(model) -> list[list[int]]:
    return [model.generate(torch.tensor([prompt]), generation_config=GREEDY)[0, len(prompt) :].tolist() for prompt in PROMPTS]


def generate_batch(model) -> list[list[int]]:
    results = model.generate_batch(
        inputs=PROMPTS, generation_config=GREEDY, continuous_batching_config=PAGED, progress_bar=False
    )
    by_request = sorted(results.values(), key=lambda result: int(re.sub(r"\D", "", result.request_id)))
    return [result.generated_tokens for result in by_request]


def check_continuous_batching(config_class, encoding: str, backend: str) -> None:
    model = build(AutoModelForCausalLM, tiny_config(config_class, encoding), backend)
    if runs_on_paged_cache(encoding):
        assert generate_batch(model) == generate_each(model)
    else:
        with pytest.raises(ValueError, match=rf"Continuous batching .* position_encoding='{encoding}'"):
            model.generate_batch(inputs=PROMPTS, generation_config=GREEDY, continuous_batching_config=PAGED)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_continuous_batching_gives_generate_tokens_or_refuses_by_name(encoding):
    check_continuous_batching(PosVarLlamaConfig, encoding, "sdpa")


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=lambda c: c.model_type)
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_every_causal_family_batches_continuously_with_rope(config_class, backend):
    """eager is run as transformers' `paged|eager`; differential attention's two kernel calls share one cache
    update."""
    check_continuous_batching(config_class, "rope", backend)


@pytest.mark.slow
@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=lambda c: c.model_type)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_continuous_batching_over_every_family_and_encoding(config_class, encoding):
    check_continuous_batching(config_class, encoding, "sdpa")


def test_continuous_batching_names_the_scheduled_encoding_it_cannot_run():
    """The refusal names the field that brought the encoding in: here a layer's entry of the schedule."""
    config = tiny_config(PosVarLlamaConfig, "nope", layer_position_encodings=["rope", "alibi"])
    model = build(AutoModelForCausalLM, config, "sdpa")
    with pytest.raises(ValueError, match=r"Continuous batching .* layer_position_encodings='alibi' \(bias\)"):
        model.generate_batch(inputs=PROMPTS, generation_config=GREEDY, continuous_batching_config=PAGED)


def test_a_non_cacheable_encoding_is_refused_for_what_it_is():
    """normalized_index is an absolute encoding, a kind the paged cache takes, but it keeps no KV cache at all."""
    model = build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "normalized_index"), "sdpa")
    with pytest.raises(ValueError, match="position_encoding='normalized_index'") as refusal:
        model.generate_batch(inputs=PROMPTS, generation_config=GREEDY, continuous_batching_config=PAGED)
    message = str(refusal.value)
    assert "keeps no KV cache" in message and "needs each key's position" not in message
    allowed = re.search(r"takes the position encodings (\[.*\])", message).group(1)
    assert set(ast.literal_eval(allowed)) == {name for name in POSITION_ENCODINGS if runs_on_paged_cache(name)}
    assert "rope" in allowed and "normalized_index" not in allowed
