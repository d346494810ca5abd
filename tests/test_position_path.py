"""The one position path: computed once per forward, a score function on flex, a lean mask on eager/SDPA,
and a value that survives gradient checkpointing in both modes."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODINGS, FAMILY_CONFIGS, VOCAB, build, family_with, tiny_config
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from hf_posvariants import POSITION_ENCODINGS, PosVarDebertaConfig, attention, modeling_posvariants
from hf_posvariants.attention import ATTENTION_VARIANTS, FlashAttentionWithBiasGradient
from hf_posvariants.bias_route import (
    BACKEND_BIAS,
    BIASLESS_BACKENDS,
    FUSED_MASK_BACKENDS,
    MAP_BACKENDS,
    MASK_BIAS_BACKENDS,
    OPEN_MASK_BACKENDS,
    PAGED_CACHE_LAYER_BACKENDS,
    SCORE_BIAS_BACKENDS,
    BiasRoute,
    choose_bias_route,
)
from hf_posvariants.differential_attention import KERNEL_CALL_CHOICES, DifferentialAttention
from hf_posvariants.evaluation.length import load_causal_lm, token_losses
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


def test_backend_groups_come_from_the_one_table():
    assert MASK_BIAS_BACKENDS == ("eager", "sdpa")
    assert SCORE_BIAS_BACKENDS == ("eager", "sdpa", "flex_attention")
    assert set(BIASLESS_BACKENDS) == set(BACKEND_BIAS) - set(SCORE_BIAS_BACKENDS)
    assert {"flash_attention_2", "paged|eager"} <= set(BIASLESS_BACKENDS)
    assert MAP_BACKENDS == OPEN_MASK_BACKENDS == ("eager",) and FUSED_MASK_BACKENDS == ("sdpa",)


def test_differential_backend_lists_come_from_the_one_table():
    """A backend added to BACKEND_BIAS reaches differential attention's kernel checks and its path choice."""
    assert DifferentialAttention.kernel_backends == tuple(BACKEND_BIAS)
    assert DifferentialAttention.paged_cache_backends == PAGED_CACHE_LAYER_BACKENDS == ("sdpa", "paged|eager")
    assert {backend for backend, _ in KERNEL_CALL_CHOICES} == set(MASK_BIAS_BACKENDS)


def route_of(encoding: str, backend: str = "sdpa", device_type: str = "cpu", **overrides) -> BiasRoute:
    """The route `choose_bias_route` picks for a training step of `encoding` (learned parameters, grad mode on)."""
    config = tiny_config(FAMILY_CONFIGS[0], encoding, num_attention_heads=4)
    bias = POSITION_ENCODINGS[encoding](config, True).score_bias(torch.arange(4), torch.arange(4), torch.arange(4)[None])
    settings = dict(grad_enabled=True, attention_dropout=False, compiling=False, layers_take_gradient_kernel=True,
                    layers_take_columns=True, single_precision=True, causal_only=False)
    settings.update(overrides)
    return choose_bias_route(backend, device_type, bias, **settings)


def test_bias_route_per_backend_device_bias_and_grad_mode():
    # A learned per-distance row trains through the CPU kernel that sends its gradient to the row (skipping the keys
    # after each query where the mask is causality alone); FIRE's bias is no row, so its gradient goes to the mask; a
    # fixed bias linear in the key (causal ALiBi) rides in an extra query/key column.
    assert route_of("t5_bias") == BiasRoute("mask", folded=True, gradient="row")
    assert route_of("t5_bias", causal_only=True) == BiasRoute("mask", folded=True, gradient="row", causal=True)
    assert route_of("fire") == BiasRoute("mask", folded=True, gradient="mask")
    assert route_of("alibi") == BiasRoute("mask", columns=True)
    assert route_of("alibi", grad_enabled=False) == BiasRoute("mask", columns=True)
    # Every condition the gradient kernel needs, one at a time.
    for overrides in (dict(grad_enabled=False), dict(attention_dropout=True), dict(compiling=True),
                      dict(layers_take_gradient_kernel=False), dict(device_type="cuda"), dict(backend="eager")):
        assert route_of("t5_bias", **overrides) == BiasRoute("mask", folded=True), overrides
    # Every condition the columns need, one at a time: else ALiBi is folded into the mask as before.
    for overrides in (dict(single_precision=False), dict(layers_take_columns=False), dict(device_type="cuda"),
                      dict(backend="eager")):
        assert route_of("alibi", **overrides) == BiasRoute("mask", folded=True), overrides
    assert route_of("t5_bias", backend="flex_attention") == BiasRoute("score_function")
    assert route_of("t5_bias", backend="flash_attention_2") == BiasRoute("none")
    assert route_of("alibi", backend="flex_attention") == BiasRoute("score_function")
    assert choose_bias_route("flex_attention", "cpu", None, grad_enabled=True, attention_dropout=False, compiling=False,
                             layers_take_gradient_kernel=True, layers_take_columns=True, single_precision=True,
                             causal_only=True) == BiasRoute("score_function")


def test_layers_own_kernel_route():
    # Layers with a fused CPU kernel of their own (DeBERTa's position terms) run it where SDPA on CPU would take its
    # math kernel: with gradients or in training mode, fp32 or wider, uncompiled, and where the mask needs no gradient.
    settings = dict(grad_enabled=True, attention_dropout=False, compiling=False, layers_take_gradient_kernel=False,
                    layers_take_columns=False, single_precision=True, causal_only=False, layers_own_kernel=True)
    assert choose_bias_route("sdpa", "cpu", None, **settings) == BiasRoute("mask", own_kernel=True)
    # Reentrant checkpointing's first run of a training step has no gradients: it takes the same kernel.
    assert choose_bias_route("sdpa", "cpu", None, **{**settings, "grad_enabled": False, "training": True}).own_kernel
    for overrides in (dict(grad_enabled=False), dict(compiling=True), dict(single_precision=False),
                      dict(layers_own_kernel=False)):
        assert choose_bias_route("sdpa", "cpu", None, **{**settings, **overrides}) == BiasRoute("mask"), overrides
    assert choose_bias_route("sdpa", "cuda", None, **settings) == BiasRoute("mask")
    assert choose_bias_route("eager", "cpu", None, **settings) == BiasRoute("mask")
    assert choose_bias_route("flex_attention", "cpu", None, **settings) == BiasRoute("score_function")
    # A shared bias folded into the mask: a fixed one leaves the kernel free, a learned one needs the mask's gradient.
    own = {key: value for key, value in settings.items() if not key.startswith("layers_take")}
    assert route_of("alibi", layers_take_columns=False, **own) == BiasRoute("mask", folded=True, own_kernel=True)
    assert route_of("t5_bias", layers_take_gradient_kernel=False, **own) == BiasRoute("mask", folded=True)


def test_bidirectional_alibi_is_not_linear_in_the_key():
    # |i − j| over keys on both sides of the query is no per-key value plus a row constant: it stays in the mask.
    config = tiny_config(FAMILY_CONFIGS[0], "alibi", num_attention_heads=4)
    bias = POSITION_ENCODINGS["alibi"](config, False).score_bias(torch.arange(4), torch.arange(4))
    settings = dict(grad_enabled=True, attention_dropout=False, compiling=False, layers_take_gradient_kernel=True,
                    layers_take_columns=True, single_precision=True, causal_only=False)
    assert not bias.linear_in_key
    assert choose_bias_route("sdpa", "cpu", bias, **settings) == BiasRoute("mask", folded=True)


@pytest.mark.parametrize(("schedule", "distinct"), [(None, 1), (["t5_bias", "alibi"], 2)])
def test_bias_route_is_decided_once_per_encoding_and_forward(monkeypatch, schedule, distinct):
    config = tiny_config(FAMILY_CONFIGS[1], "t5_bias", layer_position_encodings=schedule, num_hidden_layers=4)
    model = build(AutoModelForCausalLM, config, "sdpa").train()
    routes = []
    choose = modeling_posvariants.choose_bias_route
    monkeypatch.setattr(modeling_posvariants, "choose_bias_route", lambda *a, **k: routes.append(choose(*a, **k)) or routes[-1])
    ids = torch.randint(3, VOCAB, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    # Unpadded and causal: the kernel may apply causality itself.
    assert routes[0] == BiasRoute("mask", folded=True, gradient="row", causal=True) and len(routes) == distinct


@pytest.mark.parametrize("shared", [True, False], ids=["mask-shared-by-the-batch", "mask-per-row"])
def test_flash_attention_with_bias_gradient_matches_sdpa_math(shared):
    """The CPU kernel for a learned bias folded into the mask ≡ SDPA's math kernel, values and every gradient,
    with fully masked rows (left padding) and the mask shared by the batch or not."""
    batch, heads, length, dim = 2, 3, 9, 8
    query, key, value = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))
    bias = torch.randn(1 if shared else batch, heads, length, length, requires_grad=True)
    allowed = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
    allowed[0, :, :, :3] = False  # row 0 left-padded by three: its first three queries see nothing
    probe = torch.randn(batch, heads, length, dim)
    results = []
    for kernel in ("math", "ours"):
        mask = torch.where(allowed, bias, torch.finfo(torch.float32).min)
        if kernel == "math":
            output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3)
        else:
            output = FlashAttentionWithBiasGradient.apply(query, key, value, mask, query.new_empty(0), 0.3)
        gradients = torch.autograd.grad((output * probe).sum(), (query, key, value, bias))
        results.append((output, *gradients))
    for reference, candidate in zip(*results):
        torch.testing.assert_close(candidate, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", [True, False], ids=["padded", "unpadded"])
def test_flash_attention_with_bias_gradient_on_a_causal_mask_matches_sdpa_math(monkeypatch, padding):
    """With `causal` (the mask is causality alone besides the bias), the kernel skips the keys after each query and
    rebuilds the weights from the forward's log-sum-exp; values and every gradient, the per-distance table's too, equal
    the math kernel's, at a length spanning several backward blocks. Without `causal` the same holds on the padded mask."""
    batch, heads, length, dim = 2, 2, 40, 8
    query, key, value = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))
    table = torch.randn(heads, 2 * length - 1, requires_grad=True)
    allowed = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
    if padding:
        allowed[0, :, :, :5] = False  # row 0 left-padded by five: its first five queries see nothing
    probe = torch.randn(batch, heads, length, dim)
    monkeypatch.setattr(attention, "BIAS_GRADIENT_BLOCK", 13 * batch * heads * length)  # blocks of 13, 13, 13, 1 rows
    results = []
    for kernel in ("math", "ours"):
        mask = torch.where(allowed, table[:, distance_grid(length, length, table.device)], torch.finfo(torch.float32).min)
        if kernel == "math":
            output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3)
        else:
            output = FlashAttentionWithBiasGradient.apply(query, key, value, mask.detach(), table, 0.3, not padding)
        gradients = torch.autograd.grad((output * probe).sum(), (query, key, value, table))
        results.append((output, *gradients))
    for reference, candidate in zip(*results):
        torch.testing.assert_close(candidate, reference, atol=1e-5, rtol=1e-5)


def spy_routes(monkeypatch) -> list[BiasRoute]:
    """The routes `choose_bias_route` picks from now on, in order."""
    routes, choose = [], modeling_posvariants.choose_bias_route
    monkeypatch.setattr(modeling_posvariants, "choose_bias_route", lambda *a, **k: routes.append(choose(*a, **k)) or routes[-1])
    return routes


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("pad", [True, False], ids=["padded", "unpadded"])
def test_alibi_in_bias_columns_trains_as_eager(monkeypatch, kv_heads, pad):
    """Causal ALiBi on CPU SDPA rides in an extra query/key column, no (Q, K) bias tensor: the loss and every gradient
    equal eager's (the reference, which adds the materialised bias), with left padding and grouped KV heads. The loss
    reads real tokens' rows only: fully masked padding rows differ between eager and SDPA for every encoding (RoPE's
    too), as transformers' masks for the two backends differ there."""
    config = tiny_config(FAMILY_CONFIGS[1], "alibi", num_key_value_heads=kv_heads)
    ids, mask = padded(AutoModelForCausalLM, (12, 8) if pad else (12, 12))
    predicted = (mask[:, :-1] * mask[:, 1:]).bool()  # a real token predicting the real token after it
    routes = spy_routes(monkeypatch)
    results = []
    for backend in ("eager", "sdpa"):
        model = build(AutoModelForCausalLM, config, backend).train()
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[predicted], ids[:, 1:][predicted])
        loss.backward()
        results.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    assert routes[-1] == BiasRoute("mask", columns=True)
    (eager_loss, eager_grads), (sdpa_loss, sdpa_grads) = results
    torch.testing.assert_close(sdpa_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name, gradient in eager_grads.items():
        torch.testing.assert_close(sdpa_grads[name], gradient, atol=1e-5, rtol=1e-4, msg=name)


def test_alibi_in_bias_columns_generates_as_eager_with_and_without_cache(monkeypatch):
    """Greedy decoding of a left-padded batch: SDPA with the columns (a prefill, then one query per step against the
    cached keys, whose slots the key column carries) gives eager's scores, and the same without a cache."""
    config = tiny_config(FAMILY_CONFIGS[1], "alibi")
    ids, mask = padded(AutoModelForCausalLM)
    routes = spy_routes(monkeypatch)
    scores = {}
    for backend, use_cache in (("eager", True), ("sdpa", True), ("sdpa", False)):
        model = build(AutoModelForCausalLM, config, backend)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             use_cache=use_cache, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        scores[backend, use_cache] = torch.stack(out.scores)
    assert routes[-1] == BiasRoute("mask", columns=True)
    reference = scores["eager", True]
    torch.testing.assert_close(scores["sdpa", True], reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores["sdpa", False], reference, atol=1e-5, rtol=1e-5)


def test_alibi_columns_keep_float32_precision_at_long_context():
    """The row constant the columns add grows with the distance from the middle query; at 2,048 tokens the attention
    output still equals the materialised bias's to float32's precision at that magnitude."""
    config = tiny_config(FAMILY_CONFIGS[1], "alibi", max_position_embeddings=2048)
    encoding = POSITION_ENCODINGS["alibi"](config, True)
    length, heads, dim = 2048, 4, 8
    bias = encoding.score_bias(torch.arange(length), torch.arange(length))
    query, key, value = (torch.randn(1, heads, length, dim) for _ in range(3))
    scaling = dim**-0.5
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=bias.materialise().masked_fill(~allowed, float("-inf")), scale=scaling
    )
    wide = attention.with_bias_columns(query, key, value, bias.columns(), scaling)
    candidate = torch.nn.functional.scaled_dot_product_attention(*wide, is_causal=True, scale=scaling)[..., :dim]
    torch.testing.assert_close(candidate, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=lambda c: c.model_type)
def test_learned_bias_trains_through_the_flash_kernel_on_cpu(monkeypatch, config_class):
    """T5's bias on CPU SDPA: the flash kernel with the gradient sent per distance to the bias table (the default),
    or to the mask, gives the math kernel's step; padding leaves fully masked query rows."""
    config = tiny_config(config_class, "t5_bias")
    ids, mask = padded(AutoModelForCausalLM)
    gradients, calls = [], []
    original = FlashAttentionWithBiasGradient.apply
    monkeypatch.setattr(FlashAttentionWithBiasGradient, "apply", lambda *args: calls.append(args[4].numel()) or original(*args))
    for gradient in ("row", "mask", "autograd"):
        route = BiasRoute("mask", folded=True, gradient=gradient)
        monkeypatch.setattr(modeling_posvariants, "choose_bias_route", lambda *args, route=route, **kwargs: route)
        model = build(AutoModelForCausalLM, config, "sdpa").train()
        for module in model.modules():
            if hasattr(module, "kernel_calls"):  # differential attention: a kernel path, not its small-size maths
                module.kernel_calls = "padded_call"
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    # Every layer's kernel ran in both flash modes: given the (H, Q + K - 1) table, then no table (the mask's gradient).
    per_mode = len(calls) // 2
    assert per_mode >= config.num_hidden_layers
    assert calls == [4 * (2 * ids.shape[1] - 1)] * per_mode + [0] * per_mode
    for candidate in gradients[:2]:
        for name, gradient in gradients[2].items():
            torch.testing.assert_close(candidate[name], gradient, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("encoding", ["t5_bias", "kerple", "fire", "dynamic_bias"])
def test_learned_bias_trains_in_bf16_with_fully_masked_rows(encoding):
    """Under bf16 autocast the float32 mask's minimum becomes -inf in bf16; left padding's fully masked rows must not
    turn the flash kernel's backward into NaN (it did, for every learned distance bias): gradients finite and equal to
    eager's within bf16 rounding."""
    config = tiny_config(family_with(attention_variant="standard", norm_position="pre"), encoding)
    ids, mask = padded(AutoModelForCausalLM)
    gradients = []
    for backend in ("eager", "sdpa"):
        model = build(AutoModelForCausalLM, config, backend).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    for name, gradient in gradients[1].items():
        assert torch.isfinite(gradient).all(), name
        torch.testing.assert_close(gradient, gradients[0][name], atol=0.01, rtol=0.05, msg=name)


@pytest.mark.parametrize(("encoding", "gradient"), [("t5_bias", "row"), ("kerple", "row"), ("fire", "mask")])
def test_unpadded_learned_bias_trains_through_the_causal_kernel_as_autograd(monkeypatch, encoding, gradient):
    """Unpadded and causal, a learned bias takes the kernel's causal mode (keys after each query skipped, weights from
    the forward's log-sum-exp), its gradient sent to the row or the mask: the step's every gradient equals SDPA's math
    kernel through autograd."""
    config = tiny_config(FAMILY_CONFIGS[1], encoding)
    ids = torch.randint(3, VOCAB, (2, 12))
    routes = spy_routes(monkeypatch)
    gradients = []
    for forced in (None, BiasRoute("mask", folded=True)):
        if forced is not None:
            monkeypatch.setattr(modeling_posvariants, "choose_bias_route", lambda *args, **kwargs: forced)
        model = build(AutoModelForCausalLM, config, "sdpa").train()
        model(input_ids=ids, labels=ids).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    assert routes[0] == BiasRoute("mask", folded=True, gradient=gradient, causal=True)
    for name, reference in gradients[1].items():
        torch.testing.assert_close(gradients[0][name], reference, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.flex
def test_long_context_evaluation_runs_bias_encodings_on_flex(tmp_path):
    """eval_length's default backend: flex for a score bias, where 16k tokens need no (length × length) tensor;
    its losses equal SDPA's where both fit."""
    model = build(AutoModelForCausalLM, tiny_config(FAMILY_CONFIGS[1], "alibi", max_position_embeddings=32))
    model.save_pretrained(tmp_path / "alibi")
    build(AutoModelForCausalLM, tiny_config(FAMILY_CONFIGS[1], "rope")).save_pretrained(tmp_path / "rope")
    assert load_causal_lm(str(tmp_path / "rope")).config._attn_implementation == "sdpa"
    flex = load_causal_lm(str(tmp_path / "alibi"))
    assert flex.config._attn_implementation == "flex_attention"
    sdpa = load_causal_lm(str(tmp_path / "alibi"), attn_implementation="sdpa")
    short = torch.randint(3, VOCAB, (1, 64))
    torch.testing.assert_close(token_losses(flex, short), token_losses(sdpa, short), atol=1e-5, rtol=1e-5)
    long = torch.randint(3, VOCAB, (1, 16384))
    losses = token_losses(flex, long)
    assert losses.shape == (1, 16383) and torch.isfinite(losses).all()
