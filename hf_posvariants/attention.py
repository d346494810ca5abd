"""Self-attention of the posvariants family, dispatched through transformers' attention interface.

We ship one eager kernel, the reference: it understands an additive position bias and grouped KV
heads. SDPA (the default) and flex attention come from transformers' registry and receive the same
bias as `position_bias`. Rotary encodings arrive as (cos, sin) and rotate queries and keys here.
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .position_encodings import apply_rotary


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, T, D) → (B, H_kv·groups, T, D), each KV head serving `groups` query heads."""
    if groups == 1:
        return states
    batch, kv_heads, length, dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, kv_heads * groups, length, dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QKᵀ·scaling + position_bias + mask)·V; returns (B, T, H, D) and the weights."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Q, K)
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


# Backends whose kernels add the mask to the scores, so a bias can travel inside it.
MASK_BIAS_BACKENDS = ("eager", "sdpa")


def fold_bias_into_mask(
    position_bias: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query_slots: torch.LongTensor,
    key_slots: torch.LongTensor,
    is_causal: bool,
) -> torch.Tensor:
    """One additive float mask (B|1, H, Q, K) = position bias where attending is allowed, dtype min elsewhere.

    A bias shared by all layers is folded into the mask once per forward: handed over as `position_bias`,
    SDPA would rebuild the same mask in every layer. `attention_mask` is what transformers' masking
    utilities built: None (causal or full attention, left to the kernel), boolean, or additive float.
    """
    min_value = torch.finfo(position_bias.dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias
        allowed = key_slots[None, :] <= query_slots[:, None]  # (Q, K)
        return torch.where(allowed, position_bias, min_value)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, min_value)
    return position_bias + attention_mask


def attention_function(module: nn.Module) -> Callable:
    return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)


ATTENTION_VARIANTS: dict[str, type[nn.Module]] = {}


def register_attention_variant(name: str):
    """Class decorator that makes an attention module selectable as `config.attention_variant = name`.

    The module is built as `cls(config, layer_idx, is_causal)` and called like `PosVarAttention`.
    """

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        ATTENTION_VARIANTS[name] = cls
        return cls

    return add


@register_attention_variant("standard")
class PosVarAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) with grouped-query heads (Ainslie et al., "GQA", 2023).

    Position enters as rotary (cos, sin) applied to queries and keys, or as an additive
    `position_bias` of shape (1, heads, queries, keys) handed to the kernel.
    """

    def __init__(self, config, layer_idx: int, is_causal: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = is_causal  # read by SDPA when no mask is materialised
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        width, kv_width = self.num_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=config.attention_bias)

    @classmethod
    def validate_config(cls, config) -> None:
        """Refuse settings this variant cannot run (called by the config's validation); none here."""

    def init_variant_weights(self) -> None:
        """Initialise parameters beyond the projections (called by `_init_weights`); none here."""

    def project(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        past_key_values: Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, Q, D) and keys/values (B, H_kv, K, D), rotated and cached."""
        head_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(head_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(head_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(head_shape).transpose(1, 2)
        if position_embeddings is not None:
            query, key = apply_rotary(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        return query, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_bias: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self.project(hidden_states, position_embeddings, past_key_values)
        if position_bias is not None:
            # Flex indexes the bias per batch row, so it needs the full batch (a free view).
            kwargs["position_bias"] = position_bias.expand(query.shape[0], -1, -1, -1)
        return self.attend(query, key, value, attention_mask, **kwargs)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The backend's kernel on (B, H, T, D) heads, then the output projection back to (B, T, hidden)."""
        output, weights = attention_function(self)(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        output = self.o_proj(output.reshape(*output.shape[:2], -1))
        return output, weights
