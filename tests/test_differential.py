"""Differential attention (Ye et al., ICLR 2025): parity with transformers' DiffLlama, the paper's maths,
backends, causality, cache, padding, the bidirectional MLM, Auto round trips and config errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ENCODINGS, FAMILY_CONFIGS, VOCAB, build, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DiffLlamaConfig,
    DiffLlamaForCausalLM,
)

from hf_posvariants import POSITION_ENCODINGS, PosVarDiffConfig, PosVarLlamaConfig
from hf_posvariants import differential_attention
from hf_posvariants.attention import run_attention_kernel
from hf_posvariants.differential_attention import (
    KERNEL_CALL_CHOICES,
    KERNEL_CALLS,
    MAPS_COMPUTED_HERE,
    DifferentialAttention,
    choose_kernel_calls,
)
from hf_posvariants.position_encodings import ContextualPositions, Positions
from transformers.generation.continuous_batching import PagedAttentionCache
from hf_posvariants.conversion.diffllama import convert_diffllama, convert_diffllama_config, convert_diffllama_state_dict

CACHEABLE = [name for name in ENCODINGS if POSITION_ENCODINGS[name].cacheable]
LAYOUTS = ["pairs", "halves"]


def diff_config(encoding: str = "rope", **overrides) -> PosVarDiffConfig:
    return tiny_config(PosVarDiffConfig, encoding, **overrides)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.LongTensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_batch(left: bool, lengths=(9, 6)) -> tuple[torch.LongTensor, torch.LongTensor]:
    width = max(lengths)
    ids, mask = random_ids(len(lengths), width), torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, slice(width - length, width) if left else slice(0, length)] = 1
    return ids.masked_fill(mask == 0, 0), mask


def randomise_lambdas_and_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Initial λ vectors are small and norm weights are ones; make both matter to the comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DifferentialAttention):
                for vector in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                    vector.copy_(torch.randn(vector.shape, generator=generator) * 0.3)
                if module.groupnorm.weight is not None:
                    module.groupnorm.weight.copy_(1 + 0.5 * torch.randn(module.groupnorm.weight.shape, generator=generator))


# --- parity with transformers' DiffLlamaForCausalLM ------------------------------------------------------


def random_diffllama(attn_implementation: str, tie_word_embeddings: bool = False) -> DiffLlamaForCausalLM:
    config = DiffLlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=0.1,
        lambda_std_dev=0.3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    return DiffLlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("path", KERNEL_CALLS)
def test_converted_diffllama_matches_logits_with_padding(attn_implementation, tied, path):
    reference = random_diffllama(attn_implementation, tied)
    converted = convert_diffllama(reference).eval()
    force_kernel_calls(converted, path)
    assert converted.config._attn_implementation == attn_implementation
    ids, mask = padded_batch(left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # DiffLlama counts padding unless told; ours never does
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        actual = converted(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert expected[real].std() > 0.1  # a random model whose logits vary, not a flat one
    torch.testing.assert_close(actual[real], expected[real], rtol=0, atol=1e-5)


def test_converted_diffllama_greedy_generation_under_cache_is_equal():
    reference = random_diffllama("sdpa")
    converted = convert_diffllama(reference).eval()
    ids, mask = padded_batch(left=True)
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    expected = reference.generate(ids, **settings)
    actual = converted.generate(ids, **settings)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert len(set(expected[0, ids.shape[1] :].tolist())) > 1  # not a single repeated token


def test_diffllama_config_maps_to_halves_layout_without_affine():
    config = convert_diffllama_config(random_diffllama("eager").config)
    assert (config.differential_head_layout, config.differential_norm_affine) == ("halves", False)
    assert config.differential_lambda_init is None and config.differential_lambda_std == 0.3
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 4, 4)


def test_converter_refuses_foreign_state_dict():
    reference = random_diffllama("eager")
    config = convert_diffllama_config(reference.config)
    state_dict = dict(reference.state_dict())
    state_dict["model.layers.0.self_attn.subln.weight"] = torch.ones(8)
    del state_dict["model.layers.1.self_attn.lambda_q2"]
    with pytest.raises(ValueError, match="missing keys .*lambda_q2.*unknown keys .*subln"):
        convert_diffllama_state_dict(state_dict, config)


# --- the paper's maths, written out -------------------------------------------------------------------


def paper_differential_attention(module: DifferentialAttention, x: torch.Tensor, layer_number: int) -> torch.Tensor:
    """Ye et al., eq. 1–3, per differential head in the reference code's layout, one loop at a time.

    Head i takes query heads 2i, 2i+1; its KV pair m = i // (heads per KV pair) takes key heads 2m, 2m+1 and the
    value columns [2m·d, 2m·d + 2d).
    """
    d = module.head_dim
    pairs, kv_pairs = module.num_heads // 2, module.config.num_key_value_heads // 2
    lambda_init = 0.8 - 0.6 * math.exp(-0.3 * (layer_number - 1))
    lam = (
        torch.exp((module.lambda_q1 * module.lambda_k1).sum())
        - torch.exp((module.lambda_q2 * module.lambda_k2).sum())
        + lambda_init
    )
    q, k, v = module.q_proj(x), module.k_proj(x), module.v_proj(x)  # (T, ·)
    heads = []
    for i in range(pairs):
        m = i // (pairs // kv_pairs)
        q1, q2 = q[:, 2 * i * d : (2 * i + 1) * d], q[:, (2 * i + 1) * d : (2 * i + 2) * d]
        k1, k2 = k[:, 2 * m * d : (2 * m + 1) * d], k[:, (2 * m + 1) * d : (2 * m + 2) * d]
        value = v[:, 2 * m * d : (2 * m + 2) * d]
        map1 = torch.softmax(q1 @ k1.T / math.sqrt(d), dim=-1)
        map2 = torch.softmax(q2 @ k2.T / math.sqrt(d), dim=-1)
        head = (map1 - lam * map2) @ value  # (T, 2d)
        head = head / torch.sqrt(head.pow(2).mean(-1, keepdim=True) + module.config.norm_eps)
        if module.groupnorm.weight is not None:
            head = head * module.groupnorm.weight
        heads.append(head * (1 - lambda_init))
    return module.o_proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("kv_heads", [8, 4, 2], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("path", KERNEL_CALLS)
def test_attention_matches_paper_maths_in_reference_layout(kv_heads, affine, path):
    config = diff_config(
        "nope", num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=kv_heads, differential_norm_affine=affine
    )
    model = build(AutoModel, config)
    randomise_lambdas_and_norms(model)
    force_kernel_calls(model, path)
    x = torch.randn(1, 6, 32)
    for layer_number, layer in enumerate(model.layers, start=1):
        attention = layer.self_attn
        assert attention.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * (layer_number - 1)))
        with torch.no_grad():
            actual, _ = attention(x, None, Positions())  # eager without a mask: full attention
            expected = paper_differential_attention(attention, x[0], layer_number)
        torch.testing.assert_close(actual[0], expected, rtol=0, atol=1e-5)


def test_constant_lambda_init_option():
    model = build(AutoModel, diff_config("nope", num_hidden_layers=3, differential_lambda_init=0.5))
    assert [layer.self_attn.lambda_init for layer in model.layers] == [0.5, 0.5, 0.5]
    assert build(AutoModel, diff_config("nope", num_hidden_layers=3)).layers[2].self_attn.lambda_init == pytest.approx(
        0.8 - 0.6 * math.exp(-0.6)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_attentions_returns_every_softmax_map(layout):
    """transformers' contract (test_attention_outputs): one (B, num_attention_heads, Q, K) tensor per layer."""
    config = diff_config(num_hidden_layers=3, num_attention_heads=8, differential_head_layout=layout)
    model = build(AutoModelForCausalLM, config)
    randomise_lambdas_and_norms(model)
    with torch.no_grad():
        by_argument = model(input_ids=random_ids(2, 7), output_attentions=True).attentions
        model.config.output_attentions = True
        by_config = model(input_ids=random_ids(2, 7)).attentions
    for attentions in (by_argument, by_config):
        assert [maps.shape for maps in attentions] == [(2, 8, 7, 7)] * 3
    maps = by_argument[0]
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 8, 7), rtol=0, atol=1e-5)  # plain softmax maps
    assert maps.triu(1).abs().max() == 0  # causal
    attention = model.model.layers[0].self_attn
    differential = attention.differential_map(maps)
    lam = attention.differential_lambda().item()
    assert differential.shape == (2, 4, 7, 7)
    torch.testing.assert_close(differential.sum(-1), torch.full((2, 4, 7), 1 - lam), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", [path for path in KERNEL_CALLS if path != "blockwise_maps"])
def test_attention_maps_keep_their_gradient(layout, path):
    """transformers' contract (test_retain_grad_hidden_states_attentions): the returned maps lie on the
    output's autograd path, so `retain_grad` on them receives a gradient. (The blockwise maps keep no maps, as
    SDPA's kernels keep none.)"""
    model = build(AutoModelForCausalLM, diff_config(differential_head_layout=layout)).train()
    force_kernel_calls(model, path)
    outputs = model(input_ids=random_ids(2, 7), output_attentions=True)
    maps = outputs.attentions[0]
    maps.retain_grad()
    outputs.logits.flatten()[0].backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_output_attentions_equal_diffllama_maps():
    reference = random_diffllama("eager")
    converted = convert_diffllama(reference).eval()
    ids = random_ids(2, 9)
    with torch.no_grad():
        expected = reference(input_ids=ids, output_attentions=True).attentions
        actual = converted(input_ids=ids, output_attentions=True).attentions
    assert len(actual) == len(expected) == 3
    for ours, theirs in zip(actual, expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# --- the two kernel paths ------------------------------------------------------------------------------


def force_kernel_calls(model: torch.nn.Module, path: str) -> None:
    for module in model.modules():
        if isinstance(module, DifferentialAttention):
            module.kernel_calls = path


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("encoding", ["rope", "alibi", "t5_bias", "cope"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_paths_agree_in_values_and_gradients(monkeypatch, attn_implementation, encoding, layout):
    """The subtracted maps (whole or blockwise), and one call with 2d-wide values (queries/keys as they are or
    zero-padded) ≡ two calls on the halves (the reference, on eager), with padding and GQA; T5's learned bias and
    CoPE's contextual one get their gradients on every path."""
    monkeypatch.setattr(differential_attention, "BLOCK_ELEMENTS", 8 * 9 * 2)  # blocks of 2 query rows
    config = diff_config(encoding, num_attention_heads=8, num_key_value_heads=4, differential_head_layout=layout)
    ids, mask = padded_batch(left=True)
    results = {}
    for backend, path in [("eager", "two_calls")] + [(attn_implementation, path) for path in KERNEL_CALLS]:
        model = build(AutoModelForCausalLM, config, backend).train()
        randomise_lambdas_and_norms(model)
        force_kernel_calls(model, path)
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[mask.bool()].square().mean().backward()
        results[backend, path] = logits.detach(), {name: p.grad for name, p in model.named_parameters()}
    reference_logits, reference_grads = results["eager", "two_calls"]
    assert reference_logits[mask.bool()].std() > 0.1
    for logits, grads in results.values():
        torch.testing.assert_close(logits[mask.bool()], reference_logits[mask.bool()], rtol=0, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=0, atol=1e-5, msg=name)


def blockwise_inputs(kv_heads: int, query_length: int, key_length: int, mask: str, bias: bool):
    """Random maps-first queries (2, 8, Q, 8), keys, pair values, λ, a mask of kind `mask` ("none", "padding": boolean,
    with fully masked rows, "learned": an additive (1, 8, Q, K) bias needing a gradient, folded with padding) and,
    with `bias`, a layer's own (2, 8, Q, K) bias; every float input needs a gradient."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_()

    inputs = [randn(2, 8, query_length, 8), randn(2, kv_heads, key_length, 8), randn(2, kv_heads // 2, key_length, 16)]
    inputs.append(torch.tensor(0.4, requires_grad=True))
    allowed = torch.ones(2, 1, query_length, key_length, dtype=torch.bool).tril(key_length - query_length)
    allowed[1, :, :, :3] = False  # three padded keys: the first three query rows of batch row 1 are fully masked
    padded = allowed if mask == "padding" else None
    if mask == "learned":
        padded = torch.where(allowed, randn(1, 8, query_length, key_length), torch.finfo(torch.float32).min)
    return inputs + [padded, randn(2, 8, query_length, key_length) if bias else None]


@pytest.mark.parametrize("kv_heads", [8, 4, 2], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("mask", ["none", "padding", "learned"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "own_bias"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_blockwise_maps_equal_the_materialised_maps(monkeypatch, kv_heads, mask, bias, causal):
    """Values and gradients (queries, keys, values, λ, a learned mask, a layer's own bias) of the blockwise maps ≡
    those of the materialised maps (eager's maths), in blocks of 3 query rows or of whole batch rows, including fully
    masked rows (uniform weights over every key) and, causal without a mask, queries that are the last of the keys."""
    config = diff_config("nope", num_attention_heads=8, num_key_value_heads=kv_heads)
    attention = build(AutoModelForCausalLM, config, "sdpa").model.layers[0].self_attn
    attention.is_causal = causal
    query_length, key_length = (5, 7) if mask == "none" and causal else (7, 7)
    for block_elements in (8 * key_length * 3, 8 * key_length * query_length):
        monkeypatch.setattr(differential_attention, "BLOCK_ELEMENTS", block_elements)
        assert len(differential_attention.score_blocks(2, 8, query_length, key_length, False)) > 1
        results = []
        for method in (attention.subtract_maps, attention.subtract_maps_blockwise):
            inputs = blockwise_inputs(kv_heads, query_length, key_length, mask, bias)
            difference = method(*inputs[:3], inputs[4], inputs[3], inputs[5])
            difference = difference[0] if isinstance(difference, tuple) else difference
            probe = torch.randn(difference.shape, generator=torch.Generator().manual_seed(1))
            needing = [tensor for tensor in inputs if tensor is not None and tensor.requires_grad]
            results.append((difference, *torch.autograd.grad((difference * probe).sum(), needing)))
        assert len(results[0]) == 5 + (mask == "learned") + bias
        for expected, actual in zip(*results):
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    if mask != "none":  # fully masked rows: both maps uniform over every key, so (1 − λ)·mean(V) in every pair
        value, lam = inputs[2][1].detach(), inputs[3].item()
        groups = kv_heads // 2 and 8 // kv_heads
        expected = ((1 - lam) * value.mean(1)).repeat_interleave(groups, dim=0)  # (H/2, 2d)
        torch.testing.assert_close(results[1][0][1, :3], expected.expand(3, -1, -1), rtol=0, atol=1e-5)


def test_blockwise_maps_skip_the_keys_above_the_diagonal():
    """Causal, queries come in blocks that score only the keys up to their last row (5/8 of the square in four
    blocks), also where one block could hold every score; a query after a cache sees every key."""
    blocks = differential_attention.score_blocks(4, 4, 256, 256, causal=True)
    assert [(rows.start, rows.stop, key_end) for _, rows, key_end in blocks] == [(0, 64, 64), (64, 128, 128),
                                                                                  (128, 192, 192), (192, 256, 256)]
    assert all(batch == slice(0, 8) for batch, _, _ in blocks)  # every batch row in each
    assert [end for _, _, end in differential_attention.score_blocks(2, 4, 1, 100, causal=True)] == [100]
    assert {end for _, _, end in differential_attention.score_blocks(4, 4, 256, 256, causal=False)} == {256}


def test_kernel_path_choice_per_backend_device_and_size(monkeypatch):
    assert choose_kernel_calls("eager", "cpu", 2**30) == choose_kernel_calls("eager", "cuda") == "subtracted_maps"
    assert choose_kernel_calls("sdpa", "cpu", 4 * 4 * 128 * 128) == "subtracted_maps"  # small maps: held in memory
    assert choose_kernel_calls("sdpa", "cpu", 4 * 4 * 256 * 256) == "blockwise_maps"  # then one block at a time
    assert choose_kernel_calls("sdpa", "cpu", 4 * 4 * 1024 * 1024) == "blockwise_maps"
    assert choose_kernel_calls("flash_attention_2", "cuda") == "two_calls"  # flash: equal widths
    assert {path for paths in KERNEL_CALL_CHOICES.values() for path, _ in paths} <= set(KERNEL_CALLS)
    # The model follows the table: each kernel call's layer and query width (head_dim 8); the subtracted maps
    # call no kernel.
    calls = []

    def recording(module, query, *args, **kwargs):
        calls.append((module.layer_idx, query.shape[-1]))
        return run_attention_kernel(module, query, *args, **kwargs)

    monkeypatch.setattr(differential_attention, "run_attention_kernel", recording)
    limit = 1 * 4 * 5 * 5  # batch 1, 4 maps, 5 tokens
    cases = [("eager", (("padded_call", None),), [16]), ("sdpa", (("padded_call", None),), [16]),
             ("sdpa", (("two_calls", None),), [8, 8]), ("sdpa", (("subtracted_maps", limit), ("two_calls", None)), []),
             ("sdpa", (("subtracted_maps", limit - 1), ("padded_call", None)), [16])]
    for backend, paths, widths in cases:
        monkeypatch.setitem(KERNEL_CALL_CHOICES, (backend, "cpu"), paths)
        calls.clear()
        with torch.no_grad():
            build(AutoModelForCausalLM, diff_config(), backend)(input_ids=random_ids(1, 5))
        assert calls == [(layer, width) for layer in range(2) for width in widths], (backend, paths)


@pytest.mark.parametrize("path", ["two_calls", "padded_call"])
def test_contextual_bias_is_computed_once_per_layer(monkeypatch, path):
    """CoPE's counts come from the layer's projected queries and keys, once, however many kernel calls follow."""
    model = build(AutoModelForCausalLM, diff_config("cope"), "sdpa")
    force_kernel_calls(model, path)
    calls = []
    original = ContextualPositions.forward
    monkeypatch.setattr(ContextualPositions, "forward", lambda *args: calls.append(1) or original(*args))
    with torch.no_grad():
        model(input_ids=random_ids(2, 5))
    assert len(calls) == model.config.num_hidden_layers


def test_unknown_forced_kernel_path_is_refused():
    model = build(AutoModelForCausalLM, diff_config())
    force_kernel_calls(model, "three_calls")
    with pytest.raises(ValueError, match=r"kernel_calls='three_calls'.*'padded_call', 'two_calls'\]"):
        model(input_ids=random_ids(1, 5))


@pytest.mark.parametrize("path", MAPS_COMPUTED_HERE)
def test_maps_computed_here_are_refused_where_a_bias_is_a_score_function(path):
    model = build(AutoModelForCausalLM, diff_config("alibi"), "flex_attention")
    force_kernel_calls(model, path)
    with pytest.raises(ValueError, match=rf"kernel_calls='{path}'.*'flex_attention'.*\['eager', 'sdpa'\]"):
        model(input_ids=random_ids(1, 5))


def test_kernels_that_write_a_cache_themselves_are_refused():
    """Two kernel calls per layer under one layer_idx: flash, which writes continuous batching's paged cache itself,
    or an engine's kernel (vLLM's Transformers backend registers "vllm") would write it twice; refused before
    anything is projected or written."""
    model = build(AutoModelForCausalLM, diff_config())
    attention = model.model.layers[0].self_attn
    paged = PagedAttentionCache.__new__(PagedAttentionCache)  # unallocated: it must not be touched
    hidden = torch.zeros(1, 3, model.config.hidden_size)
    for backend in ("flash_attention_2", "flash_attention_3"):
        attention.config._attn_implementation = backend
        with pytest.raises(ValueError, match=rf"'{backend}' writes the paged KV cache.*\['sdpa', 'paged\|eager'\]"):
            attention(hidden, None, Positions(), cache=paged)
        attention.check_backend(None)  # with generate()'s caches flash is fine
    attention.config._attn_implementation = "vllm"
    with pytest.raises(ValueError, match=r"'vllm' is not supported by attention_variant='differential'.*'paged\|eager'"):
        attention(hidden, None, Positions())
    for backend in attention.paged_cache_backends:
        attention.config._attn_implementation = backend
        attention.check_backend(paged)


# --- backends, causality, cache, padding, MLM ----------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("auto_class", [AutoModelForCausalLM, AutoModelForMaskedLM], ids=["clm", "mlm"])
def test_eager_matches_sdpa_with_padding(encoding, layout, auto_class):
    config = diff_config(encoding, differential_head_layout=layout)
    eager, sdpa = build(auto_class, config, "eager"), build(auto_class, config, "sdpa")
    randomise_lambdas_and_norms(eager), randomise_lambdas_and_norms(sdpa)
    ids, mask = padded_batch(left=auto_class is AutoModelForCausalLM)
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).logits
        actual = sdpa(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.flex
@pytest.mark.parametrize("path", [path for path in KERNEL_CALLS if path not in MAPS_COMPUTED_HERE])
def test_eager_matches_flex_with_bias_and_gqa(path):
    config = diff_config("alibi")
    eager, flex = build(AutoModelForCausalLM, config, "eager"), build(AutoModelForCausalLM, config, "flex_attention")
    force_kernel_calls(flex, path)
    ids, mask = padded_batch(left=True)
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask).logits
        actual = flex(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("encoding", ["rope", "alibi", "t5_bias", "learned"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_causal_lm_is_causal(encoding, attn_implementation):
    model = build(AutoModelForCausalLM, diff_config(encoding), attn_implementation)
    ids = random_ids(1, 8)
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=0, atol=1e-6)
    assert (after[:, 5:] - before[:, 5:]).abs().max() > 1e-4


@pytest.mark.parametrize("encoding", ["rope", "alibi", "sinusoidal"])
def test_masked_lm_is_bidirectional(encoding):
    model = build(AutoModelForMaskedLM, diff_config(encoding))
    ids = random_ids(1, 8)
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, model(input_ids=changed).logits
    assert (after[:, :6] - before[:, :6]).abs().amax(-1).min() > 1e-5  # every earlier token sees the change


@pytest.mark.parametrize("encoding", CACHEABLE)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_matches_no_cache(encoding, layout):
    model = build(AutoModelForCausalLM, diff_config(encoding, differential_head_layout=layout), "sdpa")
    randomise_lambdas_and_norms(model)
    ids, mask = padded_batch(left=True)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        prefix = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        cache = prefix.cache
        steps = [prefix.logits]
        for slot in range(6, ids.shape[1]):
            step = model(input_ids=ids[:, slot : slot + 1], attention_mask=mask[:, : slot + 1], cache=cache)
            steps.append(step.logits)
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental[mask.bool()], full[mask.bool()], rtol=0, atol=1e-5)


def test_greedy_generation_with_and_without_cache_agree():
    model = build(AutoModelForCausalLM, diff_config("rope", initializer_range=0.2), "sdpa")
    ids, mask = padded_batch(left=True)
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **settings)
    torch.testing.assert_close(with_cache, model.generate(ids, use_cache=False, **settings), rtol=0, atol=0)
    assert len(set(with_cache[0, ids.shape[1] :].tolist())) > 1


@pytest.mark.parametrize("encoding", ["rope", "alibi", "t5_bias", "learned"])
@pytest.mark.parametrize("auto_class", [AutoModelForCausalLM, AutoModelForMaskedLM], ids=["clm", "mlm"])
def test_padding_does_not_change_real_tokens(encoding, auto_class):
    model = build(auto_class, diff_config(encoding), "sdpa")
    left = auto_class is AutoModelForCausalLM
    ids, mask = padded_batch(left=left, lengths=(9, 6))
    real = ids[1, 3:] if left else ids[1, :6]
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits[1]
        alone = model(input_ids=real[None]).logits[0]
    torch.testing.assert_close(batched[3:] if left else batched[:6], alone, rtol=0, atol=1e-5)


# --- families, heads, presets, save/load ----------------------------------------------------------------

HEADS = [
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
]


@pytest.mark.parametrize("auto_class", HEADS, ids=lambda cls: cls.__name__)
def test_every_head_round_trips_through_auto_classes(tmp_path, auto_class):
    model = build(auto_class, diff_config("alibi", num_labels=3))
    randomise_lambdas_and_norms(model)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "posvar_diff"
    loaded = auto_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is type(model)
    ids, mask = padded_batch(left=False)
    with torch.no_grad():
        expected, actual = model(input_ids=ids, attention_mask=mask), loaded(input_ids=ids, attention_mask=mask)
    key = "last_hidden_state" if auto_class is AutoModel else "logits"
    torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=lambda cls: cls.model_type)
def test_differential_is_one_config_change_in_every_family(config_class):
    standard = build(AutoModelForCausalLM, tiny_config(config_class, "rope", attention_variant="standard"))
    differential = build(
        AutoModelForCausalLM, tiny_config(config_class, "rope", attention_variant="differential")
    ).train()
    assert all(isinstance(layer.self_attn, DifferentialAttention) for layer in differential.model.layers)
    assert not any(isinstance(layer.self_attn, DifferentialAttention) for layer in standard.model.layers)
    extra = sum(p.numel() for p in differential.parameters()) - sum(p.numel() for p in standard.parameters())
    head_dim, layers = 8, 2
    assert extra == layers * (4 * head_dim + 2 * head_dim)  # λ vectors and the affine per-head norm
    ids = random_ids(2, 7)
    loss = differential(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in differential.parameters())


def test_matched_preset_has_baseline_projections_and_half_the_heads():
    baseline = tiny_config(PosVarLlamaConfig, "rope", num_attention_heads=8, num_key_value_heads=4)
    matched = PosVarDiffConfig.matched_to(baseline, differential_norm_affine=False)
    assert (matched.attention_variant, matched.model_type) == ("differential", "posvar_diff")
    assert (matched.num_attention_heads, matched.head_dim, matched.intermediate_size) == (8, 4, 48)
    plain, twin = build(AutoModel, baseline), build(AutoModel, matched)
    assert twin.layers[0].self_attn.num_heads // 2 == 4  # differential heads: half the baseline's eight
    extra = sum(p.numel() for p in twin.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * 4 * 4  # only the λ vectors: 2 layers × 4 vectors × head_dim 4


# --- configuration errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(differential_head_layout="interleaved"), r"differential_head_layout='interleaved'.*\['pairs', 'halves'\]"),
        (dict(num_attention_heads=2, num_key_value_heads=1), r"num_key_value_heads=1 must be even"),
        (dict(hidden_size=30, num_attention_heads=6, num_key_value_heads=3), r"num_key_value_heads=3 must be even"),
        (dict(num_attention_heads=1, num_key_value_heads=1), r"num_attention_heads=1 must be even"),
        (dict(attention_dropout=0.1), r"attention_dropout=0.1 is not supported.*allowed value is 0.0"),
        (dict(differential_lambda_init=1.2), r"differential_lambda_init=1.2 must lie in \[0, 1\)"),
        (dict(differential_lambda_std=-1.0), r"differential_lambda_std=-1.0 is not allowed; allowed values are finite numbers >= 0"),
    ],
)
def test_config_errors_name_field_value_and_allowed(overrides, message):
    with pytest.raises(ValueError, match=message):
        diff_config(**overrides)


def test_standard_variant_ignores_differential_fields():
    config = tiny_config(PosVarLlamaConfig, "rope", num_key_value_heads=1, attention_dropout=0.1)
    assert config.attention_variant == "standard"
