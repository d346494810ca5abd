"""Disentangled attention (He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled Attention", ICLR 2021),
an attention variant of the shared core.

A query i scores a key j with content and relative-position parts:

    A[i, j] = (q_i·k_j + q_i·k^r[δ(i, j)] + k_j·q^r[δ(i, j)]) / sqrt(d · (1 + #position terms))
              (c2c)      (c2p)                (p2c)

with k^r, q^r the key/query projections of the relative-embedding table of the `deberta_relative` encoding
(2k rows shared by all layers) and δ its index. Each layer projects the 2k rows once, so the position terms
are (B, H, Q, 2k) and (B, H, K, 2k) products. They take the bias route of `Positions` like any bias: eager and
SDPA receive them gathered into a pre-scaled (B, H, Q, K) tensor, flex as a score function that indexes them by
distance (no (Q, K) tensor). Training on CPU SDPA, where SDPA would fall back to its math kernel for a bias that
needs a gradient, runs `DisentangledAttentionCore` instead: the same sums with the position terms added into the
score buffer of the content product and a backward written for them (see `uses_fused_core`).

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


class DisentangledAttentionCore(torch.autograd.Function):
    """softmax(QKᵀ·scaling + c2p[.., i, δ(i, j)] + p2c[.., j, δ(i, j)] + mask)·V with c2p = Q·K_rᵀ and p2c = K·Q_rᵀ,
    on (B, H, T, D) heads and pre-scaled (H, 2k, D) position rows (either may be None); returns (B, H, Q, D).

    What SDPA's math kernel and autograd would compute, with less around the matrix products: heads are laid out
    (H, B) so that the position products run as one (B·T, D) × (D, 2k) product per head (no expanded rows, no sum
    over the batch in the backward), the position terms are written straight into the score buffer that the content
    product then adds to (`baddbmm_`), and the backward sends dS to the two terms by scatter-adds without an
    intermediate (B, H, Q, K) bias gradient. Masked slots of a boolean mask get no gradient, as with eager's
    `masked_fill`; an additive mask passes it on, as eager's sum does. `dropout` > 0 drops attention weights as
    `nn.functional.dropout` does (its own draws: the same distribution, not the same mask as another kernel's).
    """

    @staticmethod
    def forward(ctx, query, key, value, pos_key, pos_query, index, mask, scaling, dropout):
        batch, heads, query_length, dim = query.shape
        key_length = key.shape[2]
        # (H, B, T, D) contiguous: each head's B·T rows are one matrix for the position products.
        query_h, key_h, value_h = (states.transpose(0, 1).contiguous() for states in (query, key, value))
        c2p_index, p2c_index = (flat_term_index(index, rows, side) for rows, side in ((pos_key, 0), (pos_query, 1)))
        scores = position_scores(query_h, pos_key, c2p_index)
        p2c_scores = position_scores(key_h, pos_query, p2c_index)
        if scores is None:
            scores = p2c_scores
        elif p2c_scores is not None:
            scores.add_(p2c_scores)
        flat = (heads * batch, -1, dim)
        scores = scores.view(heads * batch, query_length, key_length)
        scores.baddbmm_(query_h.view(flat), key_h.view(flat).transpose(1, 2), alpha=scaling)
        blocked = None
        if mask is not None:
            mask = mask[..., :key_length].transpose(0, 1)  # (1|H, B|1, Q|1, K), broadcast over the (H, B) layout
            scores4 = scores.view(heads, batch, query_length, key_length)
            if mask.dtype == torch.bool:
                blocked = ~mask
                scores4.masked_fill_(blocked, torch.finfo(scores.dtype).min)
            else:
                scores4.add_(mask)
        weights = torch.softmax(scores, dim=-1)
        # Attention dropout as torch's own: a Bernoulli keep mask scaled by 1 / (1 - p), applied after the softmax.
        kept = None if dropout == 0.0 else torch.empty_like(weights).bernoulli_(1.0 - dropout).div_(1.0 - dropout)
        output = torch.bmm(weights if kept is None else weights * kept, value_h.view(flat))
        ctx.save_for_backward(query_h, key_h, value_h, pos_key, pos_query, c2p_index, p2c_index, weights, blocked, kept)
        ctx.scaling = scaling
        return output.view(heads, batch, query_length, dim).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_output):
        query_h, key_h, value_h, pos_key, pos_query, c2p_index, p2c_index, weights, blocked, kept = ctx.saved_tensors
        heads, batch, query_length, dim = query_h.shape
        key_length = key_h.shape[2]
        flat = (heads * batch, -1, dim)
        grad_h = grad_output.transpose(0, 1).reshape(flat)
        grad_value = torch.bmm((weights if kept is None else weights * kept).transpose(1, 2), grad_h)
        grad_weights = torch.bmm(grad_h, value_h.view(flat).transpose(1, 2))
        if kept is not None:
            grad_weights.mul_(kept)
        grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        grad_scores4 = grad_scores.view(heads, batch, query_length, key_length)
        if blocked is not None:
            grad_scores4.masked_fill_(blocked, 0.0)
        grad_c2p_query, grad_pos_key = term_gradients(grad_scores4, c2p_index, query_h, pos_key)
        grad_p2c_key, grad_pos_query = term_gradients(grad_scores4, p2c_index, key_h, pos_query)
        grad_query = states_gradient(grad_scores, key_h.view(flat), ctx.scaling, grad_c2p_query)
        grad_key = states_gradient(grad_scores.transpose(1, 2), query_h.view(flat), ctx.scaling, grad_p2c_key)

        def by_batch(grad: torch.Tensor) -> torch.Tensor:
            return grad.view(heads, batch, -1, dim).transpose(0, 1)

        grads = by_batch(grad_query), by_batch(grad_key), by_batch(grad_value), grad_pos_key, grad_pos_query
        return *grads, None, None, None, None


def flat_term_index(index: torch.LongTensor, rows: torch.Tensor | None, side: int) -> torch.LongTensor | None:
    """Where pair (i, j) reads one term in its (T·2k) products per (head, batch) item: row i (c2p, `side` 0) or row j
    (p2c, `side` 1), column δ(i, j) = `index` (Q, K). Both terms then gather and scatter in the scores' own (Q, K)
    order, with no transposed operand (a third faster for p2c than gathering by key and transposing)."""
    if rows is None:
        return None
    row = torch.arange(index.shape[side], device=index.device)
    return index + (row[:, None] if side == 0 else row[None, :]) * rows.shape[1]


def position_scores(
    states: torch.Tensor, rows: torch.Tensor | None, index: torch.LongTensor | None
) -> torch.Tensor | None:
    """One position term read at every (query, key) pair: the (H, B, T, D) `states` against the (H, 2k, D) `rows`, one
    (B·T, D) × (D, 2k) product per head, gathered by the flat `index` (Q, K) into (H, B, Q, K); None for an inactive
    term."""
    if rows is None:
        return None
    heads, batch, _, dim = states.shape
    products = torch.bmm(states.view(heads, -1, dim), rows.transpose(1, 2)).view(heads, batch, -1)
    return products.gather(-1, index.flatten().expand(heads, batch, -1)).view(heads, batch, *index.shape)


def term_gradients(
    grad_scores: torch.Tensor, index: torch.LongTensor | None, states: torch.Tensor, rows: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One position term's share of dS (H, B, Q, K): scatter-added by its flat `index` into the term's (H, B, T, 2k)
    products, then sent through them to the (H, B, T, D) `states` (as (H, B·T, D)) and to the (H, 2k, D) `rows`.
    (None, None) for an inactive term."""
    if rows is None:
        return None, None
    heads, batch, length, dim = states.shape
    grad_term = grad_scores.new_zeros(heads, batch, length * rows.shape[1])
    grad_term.scatter_add_(-1, index.flatten().expand(heads, batch, -1), grad_scores.reshape(heads, batch, -1))
    grad_term = grad_term.view(heads, -1, rows.shape[1])
    return torch.bmm(grad_term, rows), torch.bmm(grad_term.transpose(1, 2), states.view(heads, -1, dim))


def states_gradient(
    grad_scores: torch.Tensor, other: torch.Tensor, scaling: float, term_share: torch.Tensor | None
) -> torch.Tensor:
    """The (H·B, T, D) gradient of queries or keys: dS·`other`·scaling, added onto the position term's share."""
    if term_share is None:
        return torch.bmm(grad_scores, other).mul_(scaling)
    return term_share.view(grad_scores.shape[0], -1, other.shape[-1]).baddbmm_(grad_scores, other, alpha=scaling)


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

    def position_rows(self, table: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The pre-scaled (H, 2k, D) key rows of c2p and query rows of p2c (None for an inactive term)."""
        table = self.position_dropout(table)
        pos_key = pos_query = None
        if "c2p" in self.position_terms:
            pos_key = self.projected_rows(table, self.k_proj if self.share_att_key else self.pos_key_proj)
        if "p2c" in self.position_terms:
            pos_query = self.projected_rows(table, self.q_proj if self.share_att_key else self.pos_query_proj)
        return pos_key, pos_query

    def position_terms_by_row(
        self, query: torch.Tensor, key: torch.Tensor, table: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """c2p (B, H, Q, 2k) and p2c (B, H, K, 2k): every query/key against every relative row."""
        pos_key, pos_query = self.position_rows(table)
        c2p = None if pos_key is None else torch.matmul(query, pos_key.transpose(-1, -2))
        p2c = None if pos_query is None else torch.matmul(key, pos_query.transpose(-1, -2))
        return c2p, p2c

    @staticmethod
    def gathered_bias(c2p: torch.Tensor | None, p2c: torch.Tensor | None, index: torch.LongTensor) -> torch.Tensor:
        """The (B, H, Q, K) bias c2p[.., i, δ(i, j)] + p2c[.., j, δ(i, j)] for eager and SDPA."""
        bias = None
        if c2p is not None:
            bias = c2p.gather(-1, index.expand(*c2p.shape[:2], *index.shape))
        if p2c is not None:
            term = p2c.gather(-1, index.T.contiguous().expand(*p2c.shape[:2], *index.T.shape)).transpose(-1, -2)
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

    def adds_own_bias(self) -> bool:
        return bool(self.position_terms)

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
        if self.uses_fused_core(query, attention_mask, positions, cache):
            return self.fused_attend(query, key, value, attention_mask, positions)
        bias = kernel_bias(positions, self.position_terms_bias(query, key, positions))
        return self.attend(query, key, value, attention_mask, bias, **kwargs)

    def uses_fused_core(self, query: torch.Tensor, attention_mask, positions: Positions, cache: Cache | None) -> bool:
        """Whether this call runs `DisentangledAttentionCore`: SDPA on CPU in fp32 with position terms, in training mode
        or with gradients, where SDPA's own choice for a bias needing a gradient is its math kernel. The route's carrier
        stays the mask: the core adds the terms and the mask as SDPA would, and attention dropout after the softmax.
        Not with autocast, a cache, a mask that itself needs a gradient (a scheduled learned bias folded in), or while
        compiling (the graph keeps transformers' SDPA)."""
        return (
            bool(self.position_terms)
            and positions.route.carrier == "mask"
            and self.config._attn_implementation == "sdpa"
            and query.device.type == "cpu"
            and query.dtype == torch.float32
            # In training mode also without gradients: reentrant checkpointing runs the forward under no_grad and
            # recomputes it with them, and both runs must draw the same attention dropout.
            and (torch.is_grad_enabled() or self.training)
            and not torch.is_autocast_enabled(query.device.type)
            and cache is None
            and not torch.compiler.is_compiling()
            and (attention_mask is None or isinstance(attention_mask, torch.Tensor))
            and not (attention_mask is not None and attention_mask.requires_grad)
        )

    def fused_attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, positions: Positions
    ) -> tuple[torch.Tensor, None]:
        """`DisentangledAttentionCore` on (B, H, T, D) heads, then the output projection back to (B, T, hidden)."""
        table, by_distance = positions.relative
        pos_key, pos_query = self.position_rows(table)
        index = by_distance[distance_grid(query.shape[2], key.shape[2], by_distance.device)]  # (Q, K)
        output = DisentangledAttentionCore.apply(
            query, key, value, pos_key, pos_query, index, attention_mask, self.scaling,
            self.attention_dropout if self.training else 0.0,
        )
        return self.o_proj(output.transpose(1, 2).flatten(2)), None
