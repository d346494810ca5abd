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
score buffer of the content product and a backward written for them (`BiasRoute.own_kernel`).

Index convention: the reference code's (microsoft/DeBERTa, also transformers' DebertaV2), so checkpoints
carry over. It differs from the paper's equation 4 in the p2c term: the paper indexes q^r with δ(j, i), the
code with δ(i, j) (the same index as c2p).
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn
from transformers.cache_utils import Cache

from .attention import PosVarAttention, kernel_bias, register_attention_variant
from .position_encodings import POSITION_ENCODINGS, Positions, ScoreMod, distance_grid
from .validation import choice_error

POSITION_TERMS = ("c2p", "p2c")


# The most bytes of (Q, K) scores one chunk of heads computes at a time: its temporaries (scores, gathered terms, the
# scores' gradient, the terms' gradients) then stay in a core's L2 cache from the operation that writes them to the
# one that reads them, where (B, H, Q, K) temporaries of the whole batch went through memory at every step.
CHUNK_SCORE_BYTES = 1 << 20


class DisentangledAttentionCore(torch.autograd.Function):
    """softmax(QKᵀ·scaling + c2p[.., i, δ(i, j)] + p2c[.., j, δ(i, j)] + mask)·V with c2p = Q·K_rᵀ and p2c = K·Q_rᵀ,
    on (B, H, T, D) heads and pre-scaled (H, 2k, D) position rows (either may be None), δ the (Q, K) `index` and
    `layouts` the terms' `TermLayout`s under it (None: computed here); returns (B, H, Q, D).

    What SDPA's math kernel and autograd would compute, with less around the matrix products: the heads of one batch
    item are taken a chunk at a time (`head_chunks`), so every (Q, K) temporary is a chunk's and is reused by the
    next; each position term computes only the products some pair reads (`TermLayout`), which are gathered straight
    into the chunk's score buffer that the content product then adds to (`baddbmm_`), and the backward sends dS to
    the two terms by scatter-adds without an intermediate bias gradient. Heads are read in the projections' own
    (B, T, H, D) memory and the output and the input gradients are written in it, so no layout is copied. Masked slots of a boolean mask get no gradient, as with eager's
    `masked_fill`; an additive mask passes it on, as eager's sum does. `dropout` > 0 drops attention weights as
    `nn.functional.dropout` does on the (B, H, Q, K) weights (its own draws: the same distribution, not the same
    mask as another kernel's).
    """

    @staticmethod
    def forward(ctx, query, key, value, pos_key, pos_query, index, layouts, mask, scaling, dropout):
        batch, heads, query_length, dim = query.shape
        key_length = key.shape[2]
        width = chunk_width(heads, query_length * key_length * query.element_size())
        layouts = term_layouts(index) if layouts is None else layouts
        entries = term_entries(index, layouts, pos_key, pos_query, width)
        terms = position_terms(query, key, pos_key, pos_query, layouts, entries)
        mask = None if mask is None else mask[..., :key_length]
        blocked = None if mask is None or mask.dtype != torch.bool else ~mask
        weights = query.new_empty(batch, heads, query_length, key_length)
        # (B, Q, H, D) memory: the output projection reads it as (B, Q, H·D) without a copy.
        output = query.new_empty(batch, query_length, heads, dim).transpose(1, 2)
        # Attention dropout as torch's own: a Bernoulli keep mask scaled by 1 / (1 - p), applied after the softmax.
        kept = None if dropout == 0.0 else torch.empty_like(weights).bernoulli_(1.0 - dropout).div_(1.0 - dropout)
        scores = query.new_empty(width, query_length, key_length)
        gathered = query.new_empty(width, query_length * key_length) if len(terms) > 1 else None
        for item, chunk in head_chunks(batch, heads, width):
            size = chunk.stop - chunk.start
            chunk_scores = scores[:size]
            for number, term in enumerate(terms):
                term.gather(item, chunk, chunk_scores.view(size, -1) if number == 0 else gathered[:size])
                if number > 0:
                    chunk_scores.view(size, -1).add_(gathered[:size])
            beta = 1.0 if terms else 0.0  # the content product adds to the terms, or writes alone
            chunk_scores.baddbmm_(query[item, chunk], key[item, chunk].transpose(1, 2), beta=beta, alpha=scaling)
            if blocked is not None:
                chunk_scores.masked_fill_(mask_chunk(blocked, item, chunk), torch.finfo(scores.dtype).min)
            elif mask is not None:
                chunk_scores.add_(mask_chunk(mask, item, chunk))
            torch.ops.aten._softmax.out(chunk_scores, -1, False, out=weights[item, chunk])
            probabilities = weights[item, chunk] if kept is None else weights[item, chunk] * kept[item, chunk]
            torch.bmm(probabilities, value[item, chunk], out=output[item, chunk])
        ctx.save_for_backward(query, key, value, pos_key, pos_query, *entries, weights, blocked, kept)
        ctx.scaling, ctx.width, ctx.layouts = scaling, width, layouts
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, pos_key, pos_query, c2p_entries, p2c_entries, weights, blocked, kept = ctx.saved_tensors
        batch, heads, query_length, key_length = weights.shape
        terms = position_terms(query, key, pos_key, pos_query, ctx.layouts, (c2p_entries, p2c_entries))
        width, scaling = ctx.width, ctx.scaling
        grad_query, grad_key, grad_value = (projection_layout_like(states) for states in (query, key, value))
        grad_rows = [torch.zeros_like(term.rows) for term in terms]
        grad_weights = query.new_empty(width, query_length, key_length)
        grad_scores = query.new_empty(width, query_length, key_length)
        # The content product adds to a term's share of dQ / dK where there is one (beta 1), else writes alone (beta 0).
        query_beta, key_beta = float(pos_key is not None), float(pos_query is not None)
        for item, chunk in head_chunks(batch, heads, width):
            size = chunk.stop - chunk.start
            chunk_grad_scores = grad_scores[:size]
            probabilities = weights[item, chunk] if kept is None else weights[item, chunk] * kept[item, chunk]
            torch.bmm(probabilities.transpose(1, 2), grad_output[item, chunk], out=grad_value[item, chunk])
            torch.bmm(grad_output[item, chunk], value[item, chunk].transpose(1, 2), out=grad_weights[:size])
            if kept is not None:
                grad_weights[:size].mul_(kept[item, chunk])
            torch.ops.aten._softmax_backward_data.out(
                grad_weights[:size], weights[item, chunk], -1, weights.dtype, grad_input=chunk_grad_scores
            )
            if blocked is not None:
                chunk_grad_scores.masked_fill_(mask_chunk(blocked, item, chunk), 0.0)
            for term, grad_term_rows in zip(terms, grad_rows):
                term.backward(chunk_grad_scores, item, chunk, (grad_query, grad_key)[term.side], grad_term_rows)
            grad_query[item, chunk].baddbmm_(chunk_grad_scores, key[item, chunk], beta=query_beta, alpha=scaling)
            grad_key[item, chunk].baddbmm_(
                chunk_grad_scores.transpose(1, 2), query[item, chunk], beta=key_beta, alpha=scaling
            )
        by_side = {term.side: grad for term, grad in zip(terms, grad_rows)}
        return grad_query, grad_key, grad_value, by_side.get(0), by_side.get(1), None, None, None, None, None


def chunk_width(heads: int, score_bytes: int) -> int:
    """Heads per chunk: as many as fit `CHUNK_SCORE_BYTES` of scores, at least one."""
    return max(1, min(heads, CHUNK_SCORE_BYTES // max(score_bytes, 1)))


def head_chunks(batch: int, heads: int, width: int):
    """(batch item, slice of heads) of at most `width` heads, item by item."""
    for item in range(batch):
        for start in range(0, heads, width):
            yield item, slice(start, min(start + width, heads))


def mask_chunk(mask: torch.Tensor, item: int, chunk: slice) -> torch.Tensor:
    """A (B|1, H|1, Q|1, K) mask at one batch item's chunk of heads: (n|1, Q|1, K), broadcast over the chunk."""
    mask = mask[item if mask.shape[0] > 1 else 0]
    return mask[chunk] if mask.shape[0] > 1 else mask


def projection_layout_like(states: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, T, D) tensor in (B, T, H, D) memory, the layout the projections' gradient takes as is."""
    batch, heads, length, dim = states.shape
    return states.new_empty(batch, length, heads, dim).transpose(1, 2)


class PositionTerm:
    """One position term of the core: the (B, H, T, D) `states` against the pre-scaled (H, 2k, D) `rows`, computed block
    by block as `layout` packs them and read at every (query, key) pair of a chunk through `entries`, (width, Q·K)
    positions in that packing (`TermLayout.entries`, expanded over a chunk's heads). `side` 0 is c2p (queries
    against key rows), 1 p2c (keys against query rows)."""

    def __init__(self, states: torch.Tensor, rows: torch.Tensor, layout: TermLayout, entries: torch.LongTensor,
                 side: int):
        self.states, self.rows, self.layout, self.entries, self.side = states, rows, layout, entries, side

    def gather(self, item: int, chunk: slice, out: torch.Tensor) -> None:
        """The term at every (query, key) pair of one batch item's chunk of heads, written into `out` (n, Q·K)."""
        size = out.shape[0]
        products = out.new_empty(size, self.layout.size)
        for states_rows, columns, packed in self.layout.offsets():
            block = products[:, packed].view(size, states_rows.stop - states_rows.start, -1)
            torch.bmm(self.states[item, chunk, states_rows], self.rows[chunk, columns].transpose(1, 2), out=block)
        torch.gather(products, -1, self.entries[:size], out=out)

    def backward(
        self, grad_scores: torch.Tensor, item: int, chunk: slice, grad_states: torch.Tensor, grad_rows: torch.Tensor
    ) -> None:
        """The term's share of a chunk's dS (n, Q, K): scatter-added by the entries into the packed products, then
        sent through each block to its rows of the chunk's states (written into `grad_states`) and accumulated into
        its columns of `grad_rows`."""
        size = grad_scores.shape[0]
        grad_term = grad_scores.new_zeros(size, self.layout.size)
        grad_term.scatter_add_(-1, self.entries[:size], grad_scores.view(size, -1))
        for states_rows, columns, packed in self.layout.offsets():
            block = grad_term[:, packed].view(size, states_rows.stop - states_rows.start, -1)
            torch.bmm(block, self.rows[chunk, columns], out=grad_states[item, chunk, states_rows])
            grad_rows[chunk, columns].baddbmm_(block.transpose(1, 2), self.states[item, chunk, states_rows])


# Cutting a term's products into blocks of rows costs GEMM calls (one in the forward, two in the backward) and saves
# the products no pair reads: blocks are cut only where they save more than this many products per block and head.
BLOCK_CALL_PRODUCTS = 2048
# Rows per block tried besides one block of every row.
BLOCK_ROWS = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class TermLayout:
    """Which of one term's (T, 2k) products the core computes, and where each lands.

    Row r of the products (query i for c2p, key j for p2c) is read only at the columns δ(i, j) of its pairs, a range
    that slides with r under a distance index, so a term is computed as `blocks` of rows (first row, end row, first
    column, end column), each against only the columns its rows read, packed one after another into `size` products
    per head. `base[r]` is where (row r, column 0) would be in that packing."""

    blocks: tuple[tuple[int, int, int, int], ...]
    base: torch.LongTensor
    side: int

    @property
    def size(self) -> int:
        return packed_size(self.blocks)

    def offsets(self):
        """(rows, columns, the block's slice of the packing) of every block."""
        offset = 0
        for start, stop, first, end in self.blocks:
            size = (stop - start) * (end - first)
            yield slice(start, stop), slice(first, end), slice(offset, offset + size)
            offset += size

    def entries(self, index: torch.LongTensor) -> torch.LongTensor:
        """(Q·K,): every pair's product in the packing, in the scores' own (Q, K) order (no transposed operand for
        p2c, which reads row j)."""
        base = self.base.to(index.device)
        return (index + (base[:, None] if self.side == 0 else base[None, :])).flatten()


def term_layout(index: torch.LongTensor, side: int) -> TermLayout:
    """The `TermLayout` of term `side` (0 c2p, 1 p2c) under the (Q, K) index that computes the fewest products, counting
    `BLOCK_CALL_PRODUCTS` per block: one block, or blocks of one of `BLOCK_ROWS` rows."""
    by_row = (index if side == 0 else index.T).cpu()  # row r of the products → the columns its pairs read
    lowest, highest = by_row.amin(1), by_row.amax(1) + 1
    length = by_row.shape[0]
    sizes = (length, *(rows for rows in BLOCK_ROWS if rows < length))
    candidates = [row_blocks(lowest, highest, rows) for rows in sizes]
    blocks = min(candidates, key=lambda blocks: packed_size(blocks) + len(blocks) * BLOCK_CALL_PRODUCTS)
    layout = TermLayout(tuple(blocks), torch.empty(length, dtype=torch.long), side)
    for rows, columns, packed in layout.offsets():
        width = columns.stop - columns.start
        layout.base[rows] = packed.start + torch.arange(rows.stop - rows.start) * width - columns.start
    return layout


def row_blocks(lowest: torch.LongTensor, highest: torch.LongTensor, rows: int) -> list[tuple[int, int, int, int]]:
    """Blocks of `rows` rows, each with the column range [lowest, highest) its rows read."""
    length = len(lowest)
    padding = -length % rows  # a short last block, padded with values that move no minimum or maximum
    firsts = nn.functional.pad(lowest, (0, padding), value=int(lowest.max())).view(-1, rows).amin(1)
    ends = nn.functional.pad(highest, (0, padding), value=0).view(-1, rows).amax(1)
    return [(start, min(start + rows, length), first, end)
            for start, first, end in zip(range(0, length, rows), firsts.tolist(), ends.tolist())]


def packed_size(blocks: list[tuple[int, int, int, int]]) -> int:
    return sum((stop - start) * (end - first) for start, stop, first, end in blocks)


def term_layouts(index: torch.LongTensor) -> tuple[TermLayout, TermLayout]:
    """The layouts of c2p and p2c under the (Q, K) index."""
    return term_layout(index, 0), term_layout(index, 1)


@functools.lru_cache(maxsize=16)
def distance_layouts(distances: tuple[int, ...], query_length: int, key_length: int) -> tuple[TermLayout, TermLayout]:
    """`term_layouts` of a per-distance index (`distances`, as `Positions.relative` carries it), kept: every layer of
    every step at a length asks for the same ones (each entry holds O(Q + K) integers)."""
    return term_layouts(pair_index(torch.tensor(distances, dtype=torch.long), query_length, key_length))


def pair_index(by_distance: torch.LongTensor, query_length: int, key_length: int) -> torch.LongTensor:
    """δ(i, j) at every (query, key) pair, (Q, K), from the per-distance index."""
    return by_distance[distance_grid(query_length, key_length, by_distance.device)]


def position_terms(
    query: torch.Tensor, key: torch.Tensor, pos_key: torch.Tensor | None, pos_query: torch.Tensor | None,
    layouts: tuple[TermLayout, TermLayout], entries: tuple[torch.LongTensor | None, torch.LongTensor | None],
) -> list[PositionTerm]:
    """The active terms, c2p (queries against key rows) before p2c (keys against query rows)."""
    pairs = ((query, pos_key), (key, pos_query))
    return [PositionTerm(states, rows, layout, term_entries, side)
            for side, ((states, rows), layout, term_entries) in enumerate(zip(pairs, layouts, entries))
            if rows is not None]


def term_entries(
    index: torch.LongTensor, layouts: tuple[TermLayout, TermLayout], pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None, width: int,
) -> tuple[torch.LongTensor | None, torch.LongTensor | None]:
    """`TermLayout.entries` of c2p and p2c, expanded over a chunk's `width` heads; None for an inactive term."""
    return tuple(None if rows is None else layout.entries(index).expand(width, -1)
                 for rows, layout in zip((pos_key, pos_query), layouts))


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
        return self.gathered_bias(c2p, p2c, pair_index(by_distance, query.shape[2], key.shape[2]))

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
        if positions.route.own_kernel:
            return self.fused_attend(query, key, value, attention_mask, positions)
        bias = kernel_bias(positions, self.position_terms_bias(query, key, positions))
        return self.attend(query, key, value, attention_mask, bias, **kwargs)

    def has_own_kernel(self) -> bool:
        """With position terms: `DisentangledAttentionCore` computes them with the attention where the route says (SDPA
        on CPU, where SDPA's own choice for a bias needing a gradient is its math kernel)."""
        return bool(self.position_terms)

    def fused_attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, positions: Positions
    ) -> tuple[torch.Tensor, None]:
        """`DisentangledAttentionCore` on (B, H, T, D) heads, then the output projection back to (B, T, hidden)."""
        table, by_distance = positions.relative
        pos_key, pos_query = self.position_rows(table)
        query_length, key_length = query.shape[2], key.shape[2]
        index = pair_index(by_distance, query_length, key_length)
        layouts = distance_layouts(tuple(by_distance.tolist()), query_length, key_length)
        output = DisentangledAttentionCore.apply(
            query, key, value, pos_key, pos_query, index, layouts, attention_mask, self.scaling,
            self.attention_dropout if self.training else 0.0,
        )
        return self.o_proj(output.transpose(1, 2).flatten(2)), None
