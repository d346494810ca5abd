"""Classification heads, outputs and the HF conveniences every family inherits."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_CONFIGS, VOCAB, build, family_with, tiny_config
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from transformers.generation import GenerationMixin

from hf_posvariants import FAMILIES

FAMILY_IDS = [c.model_type for c in FAMILY_CONFIGS]


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=FAMILY_IDS)
def test_every_auto_class_resolves_to_the_family_class(config_class):
    config = tiny_config(config_class, "rope")
    for auto_class, model_class in FAMILIES[config_class].items():
        assert type(auto_class.from_config(config)) is model_class


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=FAMILY_IDS)
@pytest.mark.parametrize("is_decoder", [True, False], ids=["causal", "bidirectional"])
def test_sequence_classification_pools_the_same_token_with_and_without_padding(config_class, is_decoder):
    config = tiny_config(config_class, "rope", num_labels=3, is_decoder=is_decoder)
    model = build(AutoModelForSequenceClassification, config, "sdpa")
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    if is_decoder:
        mask[1, :3] = 0  # causal models pool the last real token: pad on the left
    else:
        mask[1, 5:] = 0  # bidirectional models pool the first token: pad on the right
    labels = torch.tensor([0, 2])
    output = model(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, labels=labels)
    assert output.logits.shape == (2, 3) and torch.isfinite(output.loss)
    alone = ids[1][mask[1].bool()].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(output.logits[1], model(input_ids=alone).logits[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=FAMILY_IDS)
def test_mean_pooling_and_regression(config_class):
    config = tiny_config(config_class, "alibi", num_labels=1, classifier_pooling="mean", problem_type="regression")
    model = build(AutoModelForSequenceClassification, config, "sdpa")
    ids, mask = torch.randint(3, VOCAB, (2, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    output = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0.5, -1.0]))
    assert output.logits.shape == (2, 1)
    torch.testing.assert_close(output.loss, torch.nn.functional.mse_loss(output.logits.squeeze(-1), torch.tensor([0.5, -1.0])))


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=FAMILY_IDS)
def test_token_classification_ignores_padding_labels(config_class):
    model = build(AutoModelForTokenClassification, tiny_config(config_class, "t5_bias", num_labels=5), "sdpa")
    ids = torch.randint(3, VOCAB, (2, 7))
    labels = torch.randint(0, 5, (2, 7))
    labels[1, 4:] = -100
    output = model(input_ids=ids, labels=labels)
    assert output.logits.shape == (2, 7, 5)
    expected = torch.nn.functional.cross_entropy(output.logits.reshape(-1, 5), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


def test_tie_word_embeddings_shares_the_embedding_matrix_and_its_absence_does_not():
    tied = build(AutoModelForMaskedLM, tiny_config(family_with(tie_word_embeddings=True), "sinusoidal"))
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = build(AutoModelForCausalLM, tiny_config(family_with(tie_word_embeddings=False), "rope"))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=FAMILY_IDS)
def test_hidden_states_and_attentions_are_recorded(config_class):
    model = build(AutoModelForCausalLM, tiny_config(config_class, "alibi"), "eager")
    output = model(input_ids=torch.randint(3, VOCAB, (1, 6)), output_hidden_states=True, output_attentions=True)
    assert len(output.hidden_states) == model.config.num_hidden_layers + 1
    assert len(output.attentions) == model.config.num_hidden_layers
    weights = output.attentions[0]
    assert weights.shape[0] == 1 and weights.shape[-2:] == (6, 6)
    if model.config.attention_variant == "standard":  # a differential map is a difference of two softmaxes
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 6))
    assert weights[0, :, 0, 1:].abs().max() == 0  # causal


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=FAMILY_IDS)
def test_gradient_checkpointing_gives_the_same_gradients(config_class):
    ids = torch.randint(3, VOCAB, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = build(AutoModelForCausalLM, tiny_config(config_class, "rope"), "sdpa").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_pre_norm_transformer_has_a_final_norm_and_post_norm_has_none():
    family = family_with(norm_position="post")
    post = build(AutoModel, tiny_config(family, "sinusoidal"))
    pre = build(AutoModel, tiny_config(family, "sinusoidal", norm_position="pre"))
    assert not any("model.norm" in name or name.startswith("norm.") for name, _ in post.named_parameters())
    assert any(name.startswith("norm.") for name, _ in pre.named_parameters())


@pytest.mark.contract
def test_checkpointing_function_is_transformers_own_attribute_and_receives_the_bias_table_positionally():
    """The block reaches reentrant checkpointing through transformers' `_gradient_checkpointing_func` as it is: a
    plain attribute that may be wrapped or deleted (transformers' own tests do both), called with the position
    tensors as positional arguments: on CPU SDPA the learned per-distance bias row travels beside the mask."""
    model = build(AutoModelForCausalLM, tiny_config(family_with(attention_variant="standard"), "t5_bias"), "sdpa")
    model.train().gradient_checkpointing_enable({"use_reentrant": True})
    layer, calls = model.model.layers[0], []
    checkpoint = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda function, *args: calls.append(args) or checkpoint(function, *args)
    ids = torch.randint(3, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    table = model.model.position_encoding.relative_attention_bias.weight
    assert len(calls) == 1 and any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in calls[0][3:])
    assert table.grad is not None and table.grad.abs().sum() > 0
    del layer._gradient_checkpointing_func
    model.gradient_checkpointing_disable()
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.contract
@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM])
def test_the_old_cache_name_still_works_with_a_deprecation_warning(auto_class):
    model = build(auto_class, tiny_config(FAMILY_CONFIGS[0], "rope", is_decoder=True))
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :4], use_cache=True).cache
        with pytest.warns(FutureWarning, match="past_key_values.*cache"):
            old = model(input_ids=ids[:, 4:], past_key_values=cache, use_cache=True)
    assert old.cache.get_seq_length() == 6


@pytest.mark.contract
@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=FAMILY_IDS)
def test_generating_heads_list_generation_mixin_as_a_direct_base_and_declare_fullgraph(config_class):
    for auto_class, model_class in FAMILIES[config_class].items():
        assert (GenerationMixin in model_class.__bases__) == (auto_class is AutoModelForCausalLM)
        assert model_class.can_generate() == (auto_class is AutoModelForCausalLM)
        assert model_class._can_compile_fullgraph
