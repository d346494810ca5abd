"""Disentangled attention (He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled Attention", ICLR 2021),
an attention variant of the shared core.

A query i scores a key j with content and relative-position parts:

    A[i, j] = (q_i·k_j + q_i·k^r[δ(i, j)] + k_j·q^r[δ(i, j)]) / sqrt(d · (1 + #position terms))
              (c2c)      (c2p)                (p2c)

with k^r, q^r the key/query projections of the relative-embedding table of the `deberta_relative` encoding
(2k rows shared by all layers) and δ its index. Each layer projects the 2k rows once, so the position terms
are (B, H, Q, 2k) and (B, H, K, 2k) products. They take the bias route of `Positions` like any bias: eager and
SDPA receive them gathered into a pre-scaled (B, H, Q, K) tensor, flex as a score function that indexes them by
distance (no (Q, K) tensor).

Index convention: the reference code's (microsoft/DeBERTa, also transformers' DebertaV2), so checkpoints
carry over. It differs from the paper's equation 4 in the p2c term: the paper indexes q^r with δ(j, i), the
code with δ(i, j) (the same index as c2p).
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from .attention import PosVarAttention, kernel_bias, register_attention_variant
from .position_encodings import POSITION_ENCODINGS, Positions, ScoreMod, distance_grid
from .validation import choice_error

POSITION_TERMS = ("c2p", "p2c")


@register_attention_variant("disentangled")
class DisentangledAttention(PosVarAttention):
    """DeBERTa's disentangled attention (He et al., ICLR 2021): content-to-content attention plus the
    content→position (c2p) and position→content (p2c) terms over shared relative embeddings; the content
    projections are the core's q/k/v/o."""

    relative_encoding = "deberta_relative"
    # The relative table's own fields (buckets, clipping distance, norm) are the relative encoding's.
    config_fields = ("relative_attention", "pos_att_type", "share_att_key")

    def __init__(self, config, layer_idx: int, is_causal: bool = False):
        super().__init__(config, layer_idx, is_causal)
        self.position_terms = self.active_position_terms(config)
        self.scaling = (self.head_dim * (1 + len(self.position_terms))) ** -0.5
        self.share_att_key = config.share_att_key
        width = self.num_heads * self.head_dim
        separate = not config.share_att_key
        self.pos_key_proj = nn.Linear(config.hidden_size, width) if separate and "c2p" in self.position_terms else None
        self.pos_query_proj = nn.Linear(config.hidden_size, width) if separate and "p2c" in self.position_terms else None
        self.position_dropout = nn.Dropout(config.hidden_dropout)

    @classmethod
    def validate_config(cls, config) -> None:
        fields = (*cls.config_fields, *POSITION_ENCODINGS[cls.relative_encoding].config_fields)
        missing = [field for field in fields if not hasattr(config, field)]
        if missing:
            raise ValueError(
                f"attention_variant='disentangled' needs the relative-position fields {missing} of posvar_deberta; "
                "use PosVarDebertaConfig."
            )
        unknown = [term for term in config.pos_att_type if term not in POSITION_TERMS]
        if unknown:
            raise choice_error("pos_att_type", unknown, POSITION_TERMS)
        if config.num_key_value_heads != config.num_attention_heads:
            raise ValueError(
                f"num_key_value_heads={config.num_key_value_heads} must equal num_attention_heads="
                f"{config.num_attention_heads} for attention_variant='disentangled': the position terms pair "
                "every query head with its own key head."
            )

    @classmethod
    def relative_encoding_name(cls, config) -> str | None:
        return cls.relative_encoding if config.relative_attention else None

    @staticmethod
    def active_position_terms(config) -> list[str]:
        """The position terms `config` turns on, in a fixed order; none without relative attention."""
        return [term for term in POSITION_TERMS if term in config.pos_att_type] if config.relative_attention else []

    def projected_rows(self, table: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
        """(H, 2k, D) projections of the relative table, pre-scaled (cheaper than scaling a (Q, K) result)."""
        return (projection(table) * self.scaling).unflatten(-1, (self.num_heads, self.head_dim)).transpose(0, 1)

    def position_terms_by_row(
        self, query: torch.Tensor, key: torch.Tensor, table: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """c2p (B, H, Q, 2k) and p2c (B, H, K, 2k): every query/key against every relative row."""
        table = self.position_dropout(table)
        c2p = p2c = None
        if "c2p" in self.position_terms:
            pos_key = self.projected_rows(table, self.k_proj if self.share_att_key else self.pos_key_proj)
            c2p = torch.matmul(query, pos_key.transpose(-1, -2))
        if "p2c" in self.position_terms:
            pos_query = self.projected_rows(table, self.q_proj if self.share_att_key else self.pos_query_proj)
            p2c = torch.matmul(key, pos_query.transpose(-1, -2))
        return c2p, p2c

    @staticmethod
    def gathered_bias(c2p: torch.Tensor | None, p2c: torch.Tensor | None, index: torch.LongTensor) -> torch.Tensor:
        """The (B, H, Q, K) bias c2p[.., i, δ(i, j)] + p2c[.., j, δ(i, j)] for eager and SDPA."""
        bias = None
        if c2p is not None:
            bias = c2p.gather(-1, index.expand(*c2p.shape[:2], *index.shape))
        if p2c is not None:
            term = p2c.gather(-1, index.T.expand(*p2c.shape[:2], *index.T.shape)).transpose(-1, -2)
            # In place: gather's backward does not need its output, so the sum costs no extra (B, H, Q, K).
            bias = term if bias is None else bias.add_(term)
        return bias

    @staticmethod
    def score_function(
        c2p: torch.Tensor | None, p2c: torch.Tensor | None, by_distance: torch.LongTensor, query_length: int
    ) -> ScoreMod:
        """The same terms for flex, read per (query, key) through the per-distance index."""

        def add_position_terms(score, batch, head, query, key):
            delta = by_distance[key - query + query_length - 1]
            if c2p is not None:
                score = score + c2p[batch, head, query, delta]
            if p2c is not None:
                score = score + p2c[batch, head, key, delta]
            return score

        return add_position_terms

    def takes_gradient_kernel(self, score_elements: int, device_type: str) -> bool:
        return not self.position_terms  # the terms are a bias of the layer's own

    def takes_bias_columns(self) -> bool:
        return not self.position_terms

    def position_terms_bias(
        self, query: torch.Tensor, key: torch.Tensor, positions: Positions
    ) -> torch.Tensor | ScoreMod | None:
        """c2p + p2c in the form of the route's carrier: a (B, H, Q, K) tensor, or a score function on flex."""
        if not self.position_terms:
            return None
        table, by_distance = positions.relative
        c2p, p2c = self.position_terms_by_row(query, key, table)
        if positions.route.carrier == "score_function":
            return self.score_function(c2p, p2c, by_distance, query.shape[2])
        index = by_distance[distance_grid(query.shape[2], key.shape[2], by_distance.device)]  # (Q, K)
        return self.gathered_bias(c2p, p2c, index)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: Positions,
        cache: Cache | None = None,
        key_value_states: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention, or with `key_value_states` (the Enhanced Mask Decoder) queries from `hidden_states`
        against keys and values from `key_value_states`."""
        query, key, value = self.project(hidden_states, positions, cache, key_value_states)
        bias = kernel_bias(positions, self.position_terms_bias(query, key, positions))
        return self.attend(query, key, value, attention_mask, bias, **kwargs)
