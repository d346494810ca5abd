"""Config of the posvar_diff family: the LLaMA block with differential attention (Ye et al., ICLR 2025).

Differential attention is an attention variant of the shared core, so every family can switch to it with
`attention_variant="differential"`; this family only makes it the default, on the LLaMA block.
This file imports only torch, transformers and huggingface_hub (a dependency of transformers): it travels
with remote-code checkpoints.
"""

from __future__ import annotations

import dataclasses

from huggingface_hub.dataclasses import strict

from .configuration_posvariants import PosVarConfig, PosVarLlamaConfig

# Bookkeeping fields that describe a saved checkpoint, not the architecture.
_NOT_ARCHITECTURE = ("transformers_version", "architectures")


@strict
class PosVarDiffConfig(PosVarLlamaConfig):
    r"""The Differential Transformer (Ye et al., "Differential Transformer", ICLR 2025) on the LLaMA block:
    RMSNorm pre-norm, SwiGLU, grouped-query attention, RoPE, and `attention_variant="differential"`.

    `num_attention_heads` counts softmax maps, two per differential head, so `num_attention_heads=H` gives
    H/2 differential heads of value width 2·head_dim and exactly the projections of a standard model with H
    heads: the paper's parameter matching. `matched_to(baseline)` builds that twin from any posvariants config.
    The `differential_*` fields (head layout, affine norm, λ_init, λ init scale) are documented in
    `PosVarConfig`; their defaults follow the paper's reference code.
    """

    model_type = "posvar_diff"

    attention_variant: str = "differential"

    @classmethod
    def matched_to(cls, baseline: PosVarConfig, **overrides) -> PosVarDiffConfig:
        """The differential twin of `baseline`: every architecture field equal, differential attention, and so
        half as many (twice as wide) heads at equal parameter count, plus 4·head_dim λ weights per layer
        and the per-head norm weight when it is affine."""
        fields = {
            field.name: getattr(baseline, field.name)
            for field in dataclasses.fields(PosVarConfig)
            if field.name not in _NOT_ARCHITECTURE
        }
        fields.update(attention_variant="differential", **overrides)
        return cls(**fields)
