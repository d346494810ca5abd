"""Conversion from transformers' `DiffLlamaForCausalLM` to `PosVarDiffForCausalLM`.

transformers' diffllama reads the paper with the "halves" head layout, a per-head RMSNorm without a learned
weight and the paper's λ_init depth schedule; the converted config says exactly that, so the converted
model computes the same function. Parameter names were chosen to coincide (q/k/v/o_proj, lambda_q1 …,
gate/up/down_proj, the two layer norms), so the state dict needs no renaming, only a check that nothing
is missing or left over.
"""

from __future__ import annotations

import torch
from transformers import DiffLlamaConfig, DiffLlamaForCausalLM

from ..configuration_differential import PosVarDiffConfig
from ..modeling_differential import PosVarDiffForCausalLM
from .llama import LLAMA_FIELDS

# DiffLlamaConfig field → PosVarDiffConfig field: Llama's block, and DiffLlama's λ initialisation.
_SHARED_FIELDS = {**LLAMA_FIELDS, "lambda_std_dev": "differential_lambda_std"}


# How DiffLlama reads the paper, in our config's terms (the benchmarks build the same function from it).
DIFFLLAMA_CONVENTIONS = {
    "position_encoding": "rope",
    "differential_head_layout": "halves",
    "differential_norm_affine": False,
    "differential_lambda_init": None,  # the paper's depth schedule
}


def convert_diffllama_config(config: DiffLlamaConfig) -> PosVarDiffConfig:
    """The posvar_diff config computing what `DiffLlamaForCausalLM(config)` computes."""
    fields = {ours: getattr(config, theirs) for theirs, ours in _SHARED_FIELDS.items()}
    return PosVarDiffConfig(**fields, **DIFFLLAMA_CONVENTIONS)


def convert_diffllama_state_dict(
    state_dict: dict[str, torch.Tensor], config: PosVarDiffConfig
) -> dict[str, torch.Tensor]:
    """A `DiffLlamaForCausalLM` state dict as a `PosVarDiffForCausalLM` one; refuses missing or unknown keys."""
    expected = _expected_keys(config)
    given = set(state_dict)
    if config.tie_word_embeddings:
        given.discard("lm_head.weight")  # tied: it is the embedding matrix
    missing, unknown = sorted(expected - given), sorted(given - expected)
    if missing or unknown:
        raise ValueError(
            f"not a DiffLlamaForCausalLM state dict for this config: missing keys {missing[:5]}, "
            f"unknown keys {unknown[:5]}."
        )
    return {name: state_dict[name] for name in expected}


def _expected_keys(config: PosVarDiffConfig) -> set[str]:
    with torch.device("meta"):
        model = PosVarDiffForCausalLM(config)
    keys = set(model.state_dict())
    if config.tie_word_embeddings:
        keys.discard("lm_head.weight")
    return keys


def convert_diffllama(model: DiffLlamaForCausalLM) -> PosVarDiffForCausalLM:
    """A `PosVarDiffForCausalLM` with the weights of `model`, on the same backend and dtype."""
    config = convert_diffllama_config(model.config)
    state_dict = convert_diffllama_state_dict(model.state_dict(), config)
    converted = PosVarDiffForCausalLM._from_config(
        config, attn_implementation=model.config._attn_implementation, dtype=model.dtype
    )
    converted.load_state_dict(state_dict, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        converted.tie_weights()
    return converted.to(model.device).train(model.training)
