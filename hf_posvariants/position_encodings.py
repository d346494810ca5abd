"""Position encodings: one small module per scheme, selected by `config.position_encoding`.

Every encoding declares its *kind*, which says where position enters the network:

- ``absolute``: a vector per position is added to the token embeddings (Vaswani et al. 2017 and the
  schemes before it);
- ``rotary``: queries and keys are rotated by a position-dependent angle (Su et al. 2021);
- ``bias``: an additive per-head bias on the attention scores that depends on the distance between
  query and key (Raffel et al. 2020; Press et al. 2022);
- ``contextual``: a bias computed inside each attention layer from its own queries and keys, so not a fixed
  function of position (Golovneva et al. 2024);
- ``none``: no position signal at all (Kazemnejad et al. 2023).

Each kind is a base class below (`AbsoluteEncoding`, `RotaryEncoding`, `ScoreBiasEncoding`, `RelativeEncoding`,
`ContextualEncoding`; `NoPositionEncoding` for none) that declares only its own hooks; the model calls the hook of
every stage where position may enter, a no-op on `PositionEncoding`, and passes the result down to every layer.
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import register_dataclass
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .bias_route import MASK_BIAS_BACKENDS, SCORE_BIAS_BACKENDS, BiasRoute
from .validation import choice_error, require_positive

PositionKind = Literal["absolute", "rotary", "bias", "relative", "contextual", "none"]
# The kinds whose encoding is a function of each token's own `position_ids` (added to the embeddings or rotated into
# queries and keys), reading nothing across keys.
POSITION_IDS_KINDS: tuple[PositionKind, ...] = ("absolute", "rotary", "none")

POSITION_ENCODINGS: dict[str, type[PositionEncoding]] = {}


def register_position_encoding(name: str) -> Callable[[type[PositionEncoding]], type[PositionEncoding]]:
    """Class decorator that makes an encoding selectable as ``config.position_encoding = name``."""

    def add(cls: type[PositionEncoding]) -> type[PositionEncoding]:
        cls.name = name
        POSITION_ENCODINGS[name] = cls
        return cls

    return add


def selectable_position_encodings() -> list[str]:
    """The names a config may give as `position_encoding`: every kind but `relative`, whose encodings come with
    the attention variant that consumes them (DeBERTa's disentangled attention)."""
    return [name for name, cls in POSITION_ENCODINGS.items() if cls.kind != "relative"]


def position_ids_encodings() -> list[str]:
    """The selectable encodings read from each token's `position_ids` alone (`reads_position_ids_only`): what a paged
    KV cache (continuous batching) and a sequence split over ranks (context parallelism) carry with the tokens."""
    names = selectable_position_encodings()
    return sorted(name for name in names if POSITION_ENCODINGS[name].reads_position_ids_only())


# flex_attention's score_mod: (score, batch, head, query index, key index) -> score.
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DistanceRow(NamedTuple):
    """The tables of a bias that depends on the signed distance alone: one (heads, Q + K − 1) row per head, column n
    for key − query = n − (Q − 1) (`distance_grid`). The one table a kernel may touch: it reorders the row's heads
    (differential attention) or sends the bias gradient straight into it (`FlashAttentionWithBiasGradient`)."""

    values: torch.Tensor


class BiasColumns(NamedTuple):
    """A bias that, for every key a query sees, is ``per_head[h] · per_key[j]`` plus a constant of the (head, query)
    row, which softmax ignores: one extra query column (``per_head``, divided by the kernel's scaling) and one extra key
    column (``per_key``) put it into the product QKᵀ itself (`BiasRoute.columns`)."""

    per_head: torch.Tensor  # (H,)
    per_key: torch.Tensor  # (K,), float


@dataclass
class ScoreBias:
    """An additive attention-score bias kept as a function of (head, query, key) over small tables.

    ``tables`` are what the encoding computed once per forward (a few KB: slopes, a per-distance row per head), a
    named tuple of the encoding's own type (`DistanceRow` for the distance biases); ``encoding`` turns them into a
    flex ``score_mod`` or, for backends that need a tensor, into the (1, heads, queries, keys) bias. The tables are
    tensors so that gradient checkpointing hands them to every layer as inputs.
    """

    encoding: PositionEncoding
    tables: NamedTuple
    query_length: int
    key_length: int

    @property
    def row(self) -> torch.Tensor | None:
        """The (heads, Q + K − 1) per-distance row where the bias is that row gathered at `distance_grid`, else None."""
        return self.tables.values if isinstance(self.tables, DistanceRow) else None

    @property
    def requires_grad(self) -> bool:
        """Whether any table needs a gradient (a learned bias)."""
        return any(table.requires_grad for table in self.tables)

    @property
    def linear_in_key(self) -> bool:
        """Whether the bias can ride in an extra query/key column (`columns`)."""
        return self.encoding.linear_in_key

    def columns(self) -> BiasColumns:
        return self.encoding.bias_columns(self.tables, self.query_length, self.key_length)

    def with_row(self, row: torch.Tensor) -> ScoreBias:
        """The same bias over another per-distance row (the heads reordered)."""
        return ScoreBias(self.encoding, DistanceRow(row), self.query_length, self.key_length)

    def for_heads(self, heads: slice) -> ScoreBias:
        """The bias of the model's heads `heads` alone (a tensor-parallel rank's): the tables the encoding declares per
        head (`per_head_tables`) sliced, the others shared."""
        sliced = {name: getattr(self.tables, name)[heads] for name in self.encoding.per_head_tables}
        return ScoreBias(self.encoding, self.tables._replace(**sliced), self.query_length, self.key_length)

    def score_mod(self) -> ScoreMod:
        return self.encoding.score_function(self.tables, self.query_length, self.key_length)

    def materialise(self) -> torch.Tensor:
        return self.encoding.materialise_bias(self.tables, self.query_length, self.key_length)


@dataclass
class Positions:
    """Everything the attention layers need about position, computed once per forward and handed to every layer.

    ``rotary``: (cos, sin) of shape (B, Q, rotary_dim) for rotary encodings; ``key_rotary``: the keys' (cos, sin)
    where they differ from the queries' (xPos scales the two sides inversely), else None. ``bias``: the shared score
    bias. ``relative``: the relative-embedding table and per-distance index of a ``relative`` encoding (DeBERTa), which
    its attention variant turns into per-layer position terms. ``route``: how any bias reaches the kernels, decided
    once by `choose_bias_route` (a shared bias it folds into the mask is still kept here, for the tables its gradient
    may go to). The model's blocks flatten this value into positional tensors under gradient checkpointing (see
    ``PosVarBlock``), so it survives reentrant mode.
    """

    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    key_rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    bias: ScoreBias | None = None
    relative: tuple[torch.Tensor, torch.LongTensor] | None = None
    route: BiasRoute = BiasRoute("mask")


register_dataclass(ScoreBias)
register_dataclass(Positions)


class PositionEncoding(nn.Module):
    """Base class: what every kind shares, and the stages where position may enter, each a no-op here.

    Class attributes declare capabilities, read by validation, the README table and the benchmarks:
    ``bounded`` (a finite table of ``max_position_embeddings`` positions), ``cacheable`` (a token's
    encoding does not depend on tokens after it, so a KV cache stays valid), ``backends`` (the attention
    implementations that can carry it; None means every one). ``kind`` is set by the kind's base class.
    ``config_fields`` names the config fields only this encoding reads (flat, as in config.json); its
    ``validate_config`` refuses values of them, or of shared fields, that it cannot run with.
    """

    name: ClassVar[str]
    kind: ClassVar[PositionKind]
    bounded: ClassVar[bool] = False
    cacheable: ClassVar[bool] = True
    backends: ClassVar[tuple[str, ...] | None] = None
    config_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, is_causal: bool):
        super().__init__()
        self.max_positions = config.max_position_embeddings

    @classmethod
    def validate_config(cls, config) -> None:
        """Refuse settings this encoding cannot run (called by the config's validation while it is in use)."""

    @classmethod
    def reads_position_ids_only(cls) -> bool:
        """Whether the encoding is read from each token's `position_ids` alone, unchanged as the sequence grows: so a
        paged KV cache and a sequence split over ranks (context parallelism) carry it with the tokens."""
        return cls.kind in POSITION_IDS_KINDS and cls.cacheable

    def add_to_embeddings(self, inputs_embeds: torch.Tensor, position_ids: torch.LongTensor) -> torch.Tensor:
        return inputs_embeds

    def rotary_embeddings(
        self, hidden_states: torch.Tensor, position_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def key_rotary_embeddings(
        self, hidden_states: torch.Tensor, position_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def score_bias(
        self, query_slots: torch.LongTensor, key_slots: torch.LongTensor, position_ids: torch.LongTensor | None = None
    ) -> ScoreBias | None:
        return None

    def relative_positions(
        self, query_slots: torch.LongTensor, key_slots: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.LongTensor] | None:
        return None

    @classmethod
    def layer_module(cls, config, is_causal: bool) -> nn.Module | None:
        return None

    def initial_buffers(self) -> dict[str, torch.Tensor]:
        """Values of non-persistent buffers (and of parameters that start at fixed values), recomputed when a model
        is built on the meta device."""
        return {}

    def check_positions(self, position_ids: torch.LongTensor) -> None:
        if not self.bounded or torch.compiler.is_compiling():
            return
        largest = int(position_ids.max())
        if largest >= self.max_positions:
            raise ValueError(
                f"position_encoding={self.name!r} has a table of max_position_embeddings={self.max_positions} "
                f"positions, but position {largest} was requested; allowed positions are 0..{self.max_positions - 1}. "
                "Use shorter sequences or a larger max_position_embeddings."
            )


class AbsoluteEncoding(PositionEncoding):
    """Kind ``absolute``: a vector per position added to the token embeddings."""

    kind = "absolute"

    def add_to_embeddings(self, inputs_embeds: torch.Tensor, position_ids: torch.LongTensor) -> torch.Tensor:
        raise NotImplementedError


class RotaryEncoding(PositionEncoding):
    """Kind ``rotary``: queries and keys rotated by (cos, sin) of shape (B, T, rotary_dim)."""

    kind = "rotary"

    def rotary_embeddings(self, hidden_states, position_ids):
        raise NotImplementedError

    def key_rotary_embeddings(self, hidden_states, position_ids):
        """The keys' (cos, sin) where they differ from the queries'; None means the keys use the queries' pair."""
        return None


class ScoreBiasEncoding(PositionEncoding):
    """Kind ``bias``: an additive per-head score bias shared by all layers, as small tables (`ScoreBias`) that give a
    flex score function or the materialised tensor; it reaches the kernels by the route of `choose_bias_route`."""

    kind = "bias"
    backends = SCORE_BIAS_BACKENDS
    # The fields of the encoding's tables that hold one entry per head along their first dimension, sliced to a
    # tensor-parallel rank's heads (`ScoreBias.for_heads`); None: undeclared, and tensor parallelism is refused.
    per_head_tables: ClassVar[tuple[str, ...] | None] = None
    linear_in_key: bool = False  # the bias has `bias_columns` (set per instance: it may hold in one direction only)

    def score_bias(self, query_slots, key_slots, position_ids=None) -> ScoreBias:
        """The bias of queries at ``query_slots`` against keys at ``key_slots`` (contiguous indices in the cached
        sequence), as small tables. ``position_ids`` (B, Q) are the queries' positions, for the few encodings that
        depend on more than the distance (FIRE)."""
        raise NotImplementedError

    def score_function(self, tables: NamedTuple, query_length: int, key_length: int) -> ScoreMod:
        raise NotImplementedError

    def materialise_bias(self, tables: NamedTuple, query_length: int, key_length: int) -> torch.Tensor:
        raise NotImplementedError

    def bias_columns(self, tables: NamedTuple, query_length: int, key_length: int) -> BiasColumns:
        """The bias as an extra query/key column, for an encoding whose `linear_in_key` is set."""
        raise NotImplementedError(f"position_encoding={self.name!r} has no bias columns (linear_in_key is False).")

    def attention_bias(self, query_slots: torch.LongTensor, key_slots: torch.LongTensor) -> torch.Tensor:
        """The materialised additive bias of shape (1, heads, queries, keys)."""
        return self.score_bias(query_slots, key_slots).materialise()


class RelativeEncoding(PositionEncoding):
    """Kind ``relative``: a table of relative embeddings and a per-distance index, which the attention variant that
    consumes it (DeBERTa's disentangled attention) turns into per-layer position terms."""

    kind = "relative"
    backends = SCORE_BIAS_BACKENDS

    def relative_positions(self, query_slots, key_slots):
        raise NotImplementedError


class ContextualEncoding(PositionEncoding):
    """Kind ``contextual``: a bias each attention layer computes from its own queries and keys, through the module
    it owns (`layer_module`); a tensor a kernel adds, so only the backends whose carrier is the mask."""

    kind = "contextual"
    backends = MASK_BIAS_BACKENDS

    @classmethod
    def layer_module(cls, config, is_causal):
        raise NotImplementedError


def distance_grid(
    query_length: int, key_length: int, device: torch.device, rows: slice | None = None
) -> torch.LongTensor:
    """(Q, K) index into a per-distance row of length Q + K - 1: entry [i, j] = j - i + Q - 1; only the query rows
    `rows` where given (a block of them)."""
    rows = rows or slice(0, query_length)
    queries = torch.arange(rows.start, rows.stop, device=device)[:, None]
    return torch.arange(key_length, device=device)[None, :] - queries + query_length - 1


def sinusoid_table(position_ids: torch.Tensor, dim: int, base: float = 10_000.0) -> torch.Tensor:
    """PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)), interleaved as in the paper."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim)
    angles = position_ids[..., None].float() * inv_freq  # (..., ceil(d/2))
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., 2*ceil(d/2))
    return table[..., :dim]


@register_position_encoding("sinusoidal")
class SinusoidalPositionEncoding(AbsoluteEncoding):
    """Fixed sin/cos table added to the embeddings (Vaswani et al., "Attention Is All You Need", 2017)."""

    def add_to_embeddings(self, inputs_embeds, position_ids):
        return inputs_embeds + sinusoid_table(position_ids, inputs_embeds.shape[-1]).to(inputs_embeds.dtype)


@register_position_encoding("learned")
class LearnedPositionEncoding(AbsoluteEncoding):
    """A trained table of one vector per position (BERT, Devlin et al. 2019; GPT-2, Radford et al. 2019)."""

    bounded = True

    def __init__(self, config, is_causal):
        super().__init__(config, is_causal)
        self.embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def add_to_embeddings(self, inputs_embeds, position_ids):
        self.check_positions(position_ids)
        return inputs_embeds + self.embeddings(position_ids)


@register_position_encoding("index")
class IndexPositionEncoding(AbsoluteEncoding):
    """The raw position index added to every channel: the naive scheme whose magnitude grows without bound.

    Positions are exact integers up to 2^24 in float32 but only up to 2048 in float16 and 256 in bfloat16
    (larger ones round to neighbours). float16 has no finite value beyond 65504, so a float16 model refuses
    a table (`max_position_embeddings`) that reaches past it; the attention scores computed from such large
    embeddings overflow float16 much earlier, at a position that depends on the weights: use float32 or
    bfloat16 for this encoding.
    """

    bounded = True

    def add_to_embeddings(self, inputs_embeds, position_ids):
        self.check_positions(position_ids)
        largest_finite = torch.finfo(inputs_embeds.dtype).max
        if self.max_positions - 1 > largest_finite:
            raise ValueError(
                f"position_encoding='index' with max_position_embeddings={self.max_positions} cannot run in "
                f"{inputs_embeds.dtype}: positions above {largest_finite:.0f} overflow to inf. Allowed are "
                f"max_position_embeddings <= {int(largest_finite) + 1} in this dtype, or float32/bfloat16."
            )
        return inputs_embeds + position_ids[..., None].to(inputs_embeds.dtype)


@register_position_encoding("normalized_index")
class NormalizedIndexPositionEncoding(AbsoluteEncoding):
    """Position divided by the sequence length, so values lie in [0, 1).

    The same position gets a different code in sequences of different lengths, and a token's code
    changes when the sequence grows: that is the failure mode this scheme is kept to measure. It also
    means a KV cache goes stale, so generation recomputes the whole sequence (``cacheable = False``).
    """

    cacheable = False

    def add_to_embeddings(self, inputs_embeds, position_ids):
        return inputs_embeds + (position_ids / sequence_lengths(position_ids))[..., None].to(inputs_embeds.dtype)


def sequence_lengths(position_ids: torch.LongTensor) -> torch.LongTensor:
    """Each token's sequence length, its sequence's largest position + 1, where a sequence starts at every position
    that does not follow its predecessor by one: a padding-free batch packs several sequences into a row, and
    padding positions (0) are sequences of their own, so padded and packed batches give the same lengths."""
    rows, width = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    sequence = (starts.long().cumsum(-1) - 1 + torch.arange(rows, device=position_ids.device)[:, None] * width).flatten()
    largest = torch.zeros(rows * width, dtype=position_ids.dtype, device=position_ids.device)
    largest = largest.scatter_reduce(0, sequence, position_ids.flatten(), "amax", include_self=False)
    return largest[sequence].view(rows, width) + 1


@register_position_encoding("binary")
class BinaryPositionEncoding(AbsoluteEncoding):
    """The binary code of the position, as ±1 in the first ceil(log2(max_position_embeddings)) channels."""

    bounded = True

    def __init__(self, config, is_causal):
        super().__init__(config, is_causal)
        self.num_bits = binary_width(config.max_position_embeddings)

    @classmethod
    def validate_config(cls, config) -> None:
        if binary_width(config.max_position_embeddings) > config.hidden_size:
            raise ValueError(
                f"position_encoding='binary' needs {binary_width(config.max_position_embeddings)} channels for "
                f"max_position_embeddings={config.max_position_embeddings}, more than hidden_size={config.hidden_size}."
            )

    def add_to_embeddings(self, inputs_embeds, position_ids):
        self.check_positions(position_ids)
        bit_values = 2 ** torch.arange(self.num_bits, device=position_ids.device)
        bits = (position_ids[..., None] & bit_values).ne(0).to(inputs_embeds.dtype) * 2 - 1  # (B, T, bits)
        padding = inputs_embeds.shape[-1] - self.num_bits
        return inputs_embeds + nn.functional.pad(bits, (0, padding))


def binary_width(max_positions: int) -> int:
    return max(1, math.ceil(math.log2(max_positions)))


@register_position_encoding("nope")
class NoPositionEncoding(PositionEncoding):
    """No position information (Kazemnejad et al., "The Impact of Positional Encoding on Length
    Generalization in Transformers", 2023): a causal mask alone lets a decoder infer order."""

    kind = "none"


def default_rope_parameters(config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
    """Unscaled RoPE frequencies theta^(-2i/d) over the rotated part of the head."""
    rope = config.rope_parameters
    rotary_dim = int(config.head_dim * rope.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / rotary_dim
    return 1.0 / (rope["rope_theta"] ** exponents), 1.0


@register_position_encoding("rope")
class RotaryPositionEncoding(RotaryEncoding):
    """Rotary position embedding (Su et al., "RoFormer", 2021) in transformers' half-split layout.

    ``config.rope_parameters`` selects theta, the partial rotary factor and any scaling type that
    transformers implements (linear, dynamic, yarn, llama3, longrope); their frequency functions are
    transformers' own, so a scaled checkpoint matches transformers' models exactly.
    """

    def __init__(self, config, is_causal):
        super().__init__(config, is_causal)
        # Attribute names below are the ones transformers' `dynamic_rope_update` reads.
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = self.frequency_function(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @property
    def frequency_function(self) -> Callable[..., tuple[torch.Tensor, float]]:
        return ROPE_INIT_FUNCTIONS.get(self.rope_type, default_rope_parameters)

    def initial_buffers(self):
        inv_freq, _ = self.frequency_function(self.config)
        return {"inv_freq": inv_freq, "original_inv_freq": inv_freq}

    def rotary_embeddings(self, hidden_states, position_ids):
        return self.cos_sin(hidden_states, position_ids)

    @torch.no_grad()
    @dynamic_rope_update
    def cos_sin(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, rotary_dim), half-split layout
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of (B, H, T, D) heads by (B, T, rotary_dim) cos/sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rotary_dim)
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``cos.shape[-1]`` channels of (B, H, T, D) queries and keys; the rest pass through."""
    return rotate(query, cos, sin), rotate(key, cos, sin)


def t5_relative_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucketing of ``key - query``: exact buckets for small distances, logarithmic ones up to
    ``max_distance``, one last bucket beyond. Bidirectional bucketing spends half the buckets on
    keys after the query; causal bucketing spends all of them on keys before it."""
    if bidirectional:
        num_buckets //= 2
        offset = (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        offset = torch.zeros_like(relative)
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    # Truncated before `exact` is added, as in T5: adding first can round the float up to the next integer.
    log_bucket = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return offset + torch.where(distance < exact, distance, log_bucket)


class DistanceBias(ScoreBiasEncoding):
    """Base of the bias encodings that depend only on the signed distance ``key - query``.

    A subclass gives one row per head over the distances it is asked for (``distance_table``); the row
    covering a forward's Q + K - 1 distances is computed once, then read by a flex ``score_mod`` or
    gathered into the (1, H, Q, K) tensor that eager and SDPA add to the scores. Reading a per-distance
    row rather than a small bucket table keeps the bias gradient spread over Q + K - 1 cells instead of
    being accumulated into a handful.
    """

    per_head_tables = ("values",)

    def distance_table(self, relative: torch.LongTensor) -> torch.Tensor:
        """(heads, N) bias for the N signed distances ``relative`` (key slot - query slot)."""
        raise NotImplementedError

    def score_bias(self, query_slots, key_slots, position_ids=None):
        query_length, key_length = query_slots.shape[0], key_slots.shape[0]
        # Distance of table column n: n + key_slots[0] - query_slots[-1] (see `distance_grid`).
        relative = torch.arange(query_length + key_length - 1, device=key_slots.device) + (key_slots[0] - query_slots[-1])
        return ScoreBias(self, DistanceRow(self.distance_table(relative)), query_length, key_length)

    def score_function(self, tables, query_length, key_length):
        table = tables.values

        def add_distance_bias(score, batch, head, query, key):
            return score + table[head, key - query + query_length - 1].to(score.dtype)

        return add_distance_bias

    def materialise_bias(self, tables, query_length, key_length):
        table = tables.values
        return table[:, distance_grid(query_length, key_length, table.device)].unsqueeze(0)  # (1, H, Q, K)


@register_position_encoding("t5_bias")
class T5RelativeBias(DistanceBias):
    """Learned scalar bias per head and log-spaced distance bucket, shared by all layers
    (Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
    Transformer", 2020)."""

    config_fields = ("relative_attention_num_buckets", "relative_attention_max_distance")

    def __init__(self, config, is_causal):
        super().__init__(config, is_causal)
        self.bidirectional = not is_causal
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_attention_heads)

    @classmethod
    def validate_config(cls, config) -> None:
        buckets, distance = config.relative_attention_num_buckets, config.relative_attention_max_distance
        if buckets < 4:
            raise ValueError(f"relative_attention_num_buckets={buckets} must be at least 4 for position_encoding='t5_bias'.")
        if distance <= buckets // 2:
            raise ValueError(
                f"relative_attention_max_distance={distance} must exceed relative_attention_num_buckets // 2 "
                f"= {buckets // 2} for position_encoding='t5_bias' (the logarithmic buckets start there)."
            )

    def distance_table(self, relative):
        buckets = t5_relative_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).T  # (H, N)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The paper's geometric slopes 2^(-8i/n); for a head count that is not a power of two, the slopes
    of the nearest lower power of two followed by every other slope of the next power of two."""

    def geometric(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    lower = 2 ** math.floor(math.log2(num_heads))
    extra = geometric(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(geometric(lower) + extra, dtype=torch.float32)


class AlibiTables(NamedTuple):
    """ALiBi's bias as flex reads it: no row, the (heads,) slopes and key slot − query slot of the first pair."""

    slopes: torch.Tensor
    offset: torch.Tensor


@register_position_encoding("alibi")
class ALiBiBias(DistanceBias):
    """Attention with Linear Biases (Press et al., "Train Short, Test Long", 2022): score -= m_h·|i - j|.

    The symmetric form |i - j| serves bidirectional models; under a causal mask only j <= i is seen,
    where it equals the paper's causal form m_h·(i - j). Flex computes the bias from the slopes in the
    kernel, reading no table at all. Causal, −m_h·(i − j) = m_h·j − m_h·i, and softmax ignores the second term: the
    bias is linear in the key (`bias_columns`); bidirectional, |i − j| is not.
    """

    per_head_tables = ("slopes",)

    def __init__(self, config, is_causal):
        super().__init__(config, is_causal)
        self.num_heads = config.num_attention_heads
        self.slopes = nn.Buffer(alibi_slopes(self.num_heads), persistent=False)
        self.linear_in_key = is_causal

    def initial_buffers(self):
        return {"slopes": alibi_slopes(self.num_heads)}

    def distance_table(self, relative):
        return self.linear_bias(self.slopes, relative)

    @staticmethod
    def linear_bias(slopes: torch.Tensor, relative: torch.Tensor) -> torch.Tensor:
        """(H, N) bias −m_h·|r| of the (H,) `slopes` at the N distances `relative`."""
        return -slopes[:, None] * relative.abs().float()

    def score_bias(self, query_slots, key_slots, position_ids=None):
        # The key-to-query offset is a tensor, so flex does not recompile for every decoding step.
        offset = (key_slots[0] - query_slots[0]).float()
        return ScoreBias(self, AlibiTables(self.slopes, offset), query_slots.shape[0], key_slots.shape[0])

    def score_function(self, tables, query_length, key_length):
        slopes, offset = tables.slopes, tables.offset

        def subtract_linear_distance(score, batch, head, query, key):
            return score - (slopes[head] * (key - query + offset).abs()).to(score.dtype)

        return subtract_linear_distance

    def materialise_bias(self, tables, query_length, key_length):
        relative = torch.arange(query_length + key_length - 1, device=tables.slopes.device) - (query_length - 1)
        row = DistanceRow(self.linear_bias(tables.slopes, relative + tables.offset))  # the tables' heads only
        return super().materialise_bias(row, query_length, key_length)

    def bias_columns(self, tables, query_length, key_length):
        # Key j's slot minus the middle query's: the row constant dropped, m_h·(i − middle), stays within m_h·Q/2 for a
        # prefill (float32 rounds the scores to that magnitude's precision) and is 0 for one query (a decoding step).
        keys = torch.arange(key_length, device=tables.slopes.device)
        return BiasColumns(tables.slopes, keys + tables.offset - (query_length - 1) // 2)


def deberta_log_bucket(relative: torch.LongTensor, buckets: int, max_position: int) -> torch.LongTensor:
    """DeBERTa's bucketing of signed distances (the reference code's, also transformers' DebertaV2): exact
    for |r| <= buckets // 2, then sign(r) · (mid + ceil(log(|r| / mid) / log((max_position - 1) / mid) · (mid - 1))).
    When buckets // 2 already reaches max_position - 1 there is no logarithmic range: distances stay exact
    (DebertaV2 computes the same within its span) and the caller's clamp bounds them."""
    mid = buckets // 2
    if mid >= max_position - 1:
        return relative
    distance = relative.abs()
    # Distances below mid take the exact branch; mid stands in for them so the log stays finite.
    safe = torch.where(distance < mid, torch.full_like(distance, mid), distance).float()
    logarithmic = torch.ceil(torch.log(safe / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return torch.where(distance <= mid, relative, (logarithmic * relative.sign()).long())


DEBERTA_RELATIVE_NORMS = ("none", "layer_norm")


@register_position_encoding("deberta_relative")
class DebertaRelativePositions(RelativeEncoding):
    """DeBERTa's relative positions (He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled Attention",
    ICLR 2021): one table of 2k embeddings shared by all layers, indexed by δ(i, j) = clamp(bucket(i - j) + k,
    0, 2k - 1).

    A ``relative`` encoding adds nothing by itself: the disentangled attention variant projects the table
    with each layer's query/key projections into the c2p/p2c terms. It owns posvar_deberta's
    ``position_buckets``, ``max_relative_positions`` and ``norm_rel_ebd``.
    """

    config_fields = ("position_buckets", "max_relative_positions", "norm_rel_ebd")

    @classmethod
    def validate_config(cls, config) -> None:
        if config.norm_rel_ebd not in DEBERTA_RELATIVE_NORMS:
            raise choice_error("norm_rel_ebd", config.norm_rel_ebd, DEBERTA_RELATIVE_NORMS)
        if config.max_relative_positions == 0 or config.max_relative_positions < -1:
            raise ValueError(
                f"max_relative_positions={config.max_relative_positions} is not allowed; allowed values are integers "
                f">= 1, or -1 for max_position_embeddings={config.max_position_embeddings}."
            )
        # Buckets beyond the span are allowed, as in DebertaV2: distances within it then stay exact.
        if config.position_buckets != -1 and config.position_buckets < 2:
            raise ValueError(
                f"position_buckets={config.position_buckets} is not allowed; allowed values are -1 (no buckets) or "
                "integers >= 2 (log buckets)."
            )

    @staticmethod
    def max_relative_positions_of(config) -> int:
        """The clipping distance: `max_relative_positions`, or max_position_embeddings for -1."""
        return config.max_relative_positions if config.max_relative_positions > 0 else config.max_position_embeddings

    @classmethod
    def span_of(cls, config) -> int:
        """k: relative indices run over [0, 2k); the shared table has 2k rows."""
        return config.position_buckets if config.position_buckets > 0 else cls.max_relative_positions_of(config)

    def __init__(self, config, is_causal):
        super().__init__(config, is_causal)
        self.span = self.span_of(config)
        self.buckets = config.position_buckets
        self.max_relative_positions = self.max_relative_positions_of(config)
        self.embeddings = nn.Embedding(2 * self.span, config.hidden_size)
        layer_norm = config.norm_rel_ebd == "layer_norm"
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps) if layer_norm else nn.Identity()

    @staticmethod
    def keeps_rows_read_only(device: torch.device) -> bool:
        """Whether `relative_positions` trims the table to the rows read: where finding them costs no wait."""
        return device.type == "cpu" and not torch.compiler.is_compiling()

    def relative_positions(self, query_slots, key_slots):
        """The normalised table (rows, hidden) and δ per distance into it: entry n is for key - query = n - (Q - 1).
        The rows are the 2k of the table, or on the CPU only those some pair reads (at 128 tokens 255 of DeBERTa-v3's
        512): every layer projects the rows it is given and multiplies every query and key by them. On an accelerator
        finding them would wait for the device, and a compiled graph would break there."""
        device = query_slots.device
        key_minus_query = torch.arange(query_slots.shape[0] + key_slots.shape[0] - 1, device=device) + (key_slots[0] - query_slots[-1])
        relative = -key_minus_query  # the reference indexes by i - j
        if self.buckets > 0:
            relative = deberta_log_bucket(relative, self.buckets, self.max_relative_positions)
        by_distance = (relative + self.span).clamp(0, 2 * self.span - 1)
        first, end = 0, 2 * self.span
        if self.keeps_rows_read_only(device):
            first, end = int(by_distance.min()), int(by_distance.max()) + 1
        # Looked up through the module rather than read as `.weight` (whose device is "meta" when offloaded), so
        # accelerate's hooks load it.
        table = self.norm(self.embeddings(torch.arange(first, end, device=device)))
        return table, by_distance - first


# --- Schemes beyond the anchors --------------------------------------------------------------------------------


@register_position_encoding("xpos")
class XPosEncoding(RotaryEncoding):
    """xPos (Sun et al., "A Length-Extrapolatable Transformer", 2022): RoPE whose query at position n is scaled by
    ζ^(n/B) and key at position m by ζ^(−m/B), so each channel pair's score decays as ζ_i^((n−m)/B).

    ζ_i = (2i/d + γ)/(1 + γ) with γ = 0.4 over the rotated channel pairs, B = ``config.xpos_scale_base``; the
    frequencies are RoPE's (``rope_parameters``: ``rope_theta``, ``partial_rotary_factor``). The exponent is
    measured from a fixed centre, max_position_embeddings // 2, which leaves the scores unchanged (only n − m
    matters) and keeps the factors near 1 in the trained range; being fixed, it leaves cached keys valid. In a
    bidirectional model the same factor grows for keys after the query, as the paper's formula gives.
    """

    gamma: ClassVar[float] = 0.4
    config_fields = ("xpos_scale_base",)

    @classmethod
    def validate_config(cls, config) -> None:
        require_positive(config, cls.config_fields, "position_encoding='xpos'")
        rope_type = config.rope_parameters.get("rope_type", "default")
        rotary_dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        if rope_type != "default":
            raise ValueError(
                f"rope_parameters['rope_type']={rope_type!r} is not supported with position_encoding='xpos' "
                "(its decay replaces RoPE's scalings); allowed value is 'default'."
            )
        if rotary_dim % 2 or rotary_dim == 0:
            raise ValueError(
                f"position_encoding='xpos' rotates channel pairs, so head_dim × partial_rotary_factor must be a "
                f"positive even number; got head_dim={config.head_dim} (rotary dim {rotary_dim})."
            )

    def __init__(self, config, is_causal):
        super().__init__(config, is_causal)
        self.config = config
        self.scale_base = config.xpos_scale_base
        self.centre = config.max_position_embeddings // 2
        buffers = self.initial_buffers()
        self.inv_freq = nn.Buffer(buffers["inv_freq"], persistent=False)
        self.decay = nn.Buffer(buffers["decay"], persistent=False)

    def initial_buffers(self):
        inv_freq, _ = default_rope_parameters(self.config)
        pairs = torch.arange(len(inv_freq), dtype=torch.float32)
        return {"inv_freq": inv_freq, "decay": (2 * pairs / (2 * len(inv_freq)) + self.gamma) / (1 + self.gamma)}

    def scaled_cos_sin(self, x: torch.Tensor, position_ids: torch.LongTensor, sign: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's (cos, sin) times ζ^(sign·(n − centre)/B), in the half-split layout: (B, T, rotary_dim) each."""
        positions = position_ids[..., None].float()
        angles = positions * self.inv_freq.float()  # (B, T, rotary_dim / 2)
        scale = self.decay.float() ** (sign * (positions - self.centre) / self.scale_base)
        cos, sin = angles.cos() * scale, angles.sin() * scale
        return torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((sin, sin), dim=-1).to(x.dtype)

    def rotary_embeddings(self, hidden_states, position_ids):
        return self.scaled_cos_sin(hidden_states, position_ids, sign=1)

    def key_rotary_embeddings(self, hidden_states, position_ids):
        return self.scaled_cos_sin(hidden_states, position_ids, sign=-1)


KERPLE_VARIANTS = ("log", "power")


@register_position_encoding("kerple")
class KerpleBias(DistanceBias):
    """KERPLE (Chi et al., "KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation", NeurIPS 2022):
    a conditionally positive definite kernel of the distance as the bias, −r1·log(1 + r2·|i − j|) (``log``) or
    −r1·|i − j|^r2 with r2 ≤ 2 (``power``), ``config.kerple_variant``.

    r1, r2 are learned per head and kept positive as in the paper's code, by clamping at 0.01 (and r2 at 2 for the
    power kernel). They start from ALiBi's slopes so heads begin at different ranges: the power kernel with r2 = 1
    is ALiBi itself (for slopes above the clamp); the log kernel starts with r1 = 1 and r2 = the slopes.
    """

    min_parameter: ClassVar[float] = 1e-2
    config_fields = ("kerple_variant",)

    @classmethod
    def validate_config(cls, config) -> None:
        if config.kerple_variant not in KERPLE_VARIANTS:
            raise choice_error("kerple_variant", config.kerple_variant, KERPLE_VARIANTS)

    def __init__(self, config, is_causal):
        super().__init__(config, is_causal)
        self.variant = config.kerple_variant
        self.num_heads = config.num_attention_heads
        initial = self.initial_buffers()
        self.scale = nn.Parameter(initial["scale"])
        self.shape_parameter = nn.Parameter(initial["shape_parameter"])

    def initial_buffers(self):
        slopes = alibi_slopes(self.num_heads)
        if self.variant == "power":
            return {"scale": slopes, "shape_parameter": torch.ones(self.num_heads)}
        return {"scale": torch.ones(self.num_heads), "shape_parameter": slopes}

    def kernel_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r1, r2), each (heads,), clamped into the kernel's domain."""
        r1 = self.scale.clamp(min=self.min_parameter)
        if self.variant == "power":
            return r1, self.shape_parameter.clamp(self.min_parameter, 2.0)
        return r1, self.shape_parameter.clamp(min=self.min_parameter)

    def distance_table(self, relative):
        distance = relative.abs().float()[None, :]  # (1, N)
        r1, r2 = (p[:, None] for p in self.kernel_parameters())
        if self.variant == "power":
            return -r1 * distance.pow(r2)
        return -r1 * torch.log1p(r2 * distance)


@register_position_encoding("dynamic_bias")
class DynamicPositionBias(DistanceBias):
    """A continuous position bias: a small MLP maps the log-spaced signed distance sign(d)·log(1 + |d|) to one bias
    per head (Liu et al., "Swin Transformer V2", CVPR 2022; the "dynamic position bias" of x-transformers).

    ``dynamic_bias_layers`` SiLU layers of width ``dynamic_bias_hidden_size``, then a linear map to the heads; the
    MLP is evaluated once per forward over the Q + K − 1 distances in play.
    """

    config_fields = ("dynamic_bias_hidden_size", "dynamic_bias_layers")

    @classmethod
    def validate_config(cls, config) -> None:
        require_positive(config, cls.config_fields, "position_encoding='dynamic_bias'")

    def __init__(self, config, is_causal):
        super().__init__(config, is_causal)
        width = config.dynamic_bias_hidden_size
        layers: list[nn.Module] = [nn.Linear(1, width), nn.SiLU()]
        for _ in range(config.dynamic_bias_layers - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(width, config.num_attention_heads))

    def distance_table(self, relative):
        features = relative.sign() * torch.log1p(relative.abs().float())  # (N,)
        return self.mlp(features[:, None].to(self.mlp[0].weight.dtype)).T  # (H, N)


class FireTables(NamedTuple):
    """FIRE's bias as flex reads it: the MLP's weights and the interpolation's inputs, no (Q, K) tensor."""

    positions: torch.Tensor  # (B, Q) or (1, Q) when every row has the same positions: the queries' positions
    offset: torch.Tensor  # key slot − query slot = key index − query index + this
    c: torch.Tensor  # ψ's learned scale, positive
    threshold: torch.Tensor  # L, positive
    w1: torch.Tensor  # (W,): first layer, one input
    b1: torch.Tensor  # (W,)
    w2: torch.Tensor  # (H, W): second layer
    b2: torch.Tensor  # (H,)


def shared_positions(position_ids: torch.LongTensor) -> torch.LongTensor:
    """`position_ids` (B, Q) as one row (1, Q) where every row holds the same positions (the model's own positions
    when no mask is given, or a batch without padding), so a bias that reads them is built once for the batch. The
    comparison of rows is skipped under compilation, where it would break the graph."""
    if position_ids.shape[0] == 1 or position_ids.stride(0) == 0:
        return position_ids[:1]
    if not torch.compiler.is_compiling() and bool((position_ids == position_ids[:1]).all()):
        return position_ids[:1]
    return position_ids


class FirePieces(NamedTuple):
    """FIRE's MLP f(x) = b2 + w2·relu(w1·x + b1) as the piecewise-linear function of one input that it is: on piece k,
    between the k-th and (k+1)-th of the sorted points −b1/w1 where a hidden unit switches, f_h(x) = intercepts[h, k]
    + slopes[h, k]·x. Intercepts and slopes are differentiable in the weights, exactly as the MLP is, away from the
    switching points themselves (where ReLU's own gradient is a convention)."""

    breakpoints: torch.Tensor  # (W,) sorted; +inf for a unit whose input weight is 0 (it never switches)
    intercepts: torch.Tensor  # (H, W + 1)
    slopes: torch.Tensor  # (H, W + 1)


def fire_pieces(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> FirePieces:
    """The pieces of FIRE's MLP from its weights (see `FirePieces`)."""
    weight, bias = w1.detach(), b1.detach()
    switch = torch.where(weight != 0, -bias / weight, torch.inf)
    breakpoints, order = switch.sort()
    rank = order.argsort()  # (W,): each unit's place among the sorted points
    pieces = torch.arange(weight.shape[0] + 1, device=weight.device)
    passed = rank[:, None] < pieces[None, :]  # (W, pieces): x lies beyond the unit's point on this piece
    # A unit is on where w1·x + b1 > 0: beyond its point for w1 > 0, before it for w1 < 0, always or never for w1 = 0.
    on = torch.where(weight[:, None] > 0, passed, torch.where(weight[:, None] < 0, ~passed, bias[:, None] > 0))
    on = on.to(w2.dtype)
    return FirePieces(breakpoints, b2[:, None] + w2 @ (on * b1[:, None]), w2 @ (on * w1[:, None]))


# Elements of one (B, H, query rows, keys) block that `PiecewiseFireBias` builds or reduces at a time: 4 MiB in fp32.
FIRE_BIAS_BLOCK = 1 << 20


class PiecewiseFireBias(torch.autograd.Function):
    """FIRE's (B|1, H, Q, K) bias b = f(ψ(|j − i|) / ψ(max(L, i))) from its factors, one block of query rows at a time.

    The input x = ψ(|j − i|) / N_i is the per-distance row ψ over the (B|1, Q) normalisers N, and f is piecewise
    linear (`FirePieces`), so the bias is intercepts + slopes·x read at x's piece. The backward reduces the bias
    gradient G blockwise to the gradients of those small factors: per piece Σ G and Σ G·x, per distance Σ ∂x/N, per
    query −Σ ∂x·x/N with ∂x = Σ_h G·slopes. Autograd carries them on to the MLP's weights, c and L, so no (Q, K)
    tensor per hidden unit is ever formed, and nothing of size Q × K is kept for the backward.
    """

    @staticmethod
    def forward(ctx, distance_row, normaliser, breakpoints, intercepts, slopes, query_length: int, dtype: torch.dtype):
        key_length = distance_row.shape[0] - query_length + 1
        batch, heads = normaliser.shape[0], intercepts.shape[0]
        bias = torch.empty(batch, heads, query_length, key_length, dtype=dtype, device=distance_row.device)
        intercepts32, slopes32 = intercepts.detach().float(), slopes.detach().float()
        for rows, x, piece in PiecewiseFireBias.blocks(distance_row, normaliser, breakpoints, query_length, heads):
            for head in range(heads):
                bias[:, head, rows] = intercepts32[head][piece] + slopes32[head][piece] * x
        ctx.save_for_backward(distance_row, normaliser, breakpoints, intercepts, slopes)
        ctx.query_length = query_length
        return bias

    @staticmethod
    def backward(ctx, grad_bias):
        distance_row, normaliser, breakpoints, intercepts, slopes = ctx.saved_tensors
        query_length, heads = ctx.query_length, intercepts.shape[0]
        slopes32 = slopes.detach().float()
        grad_intercepts = torch.zeros(intercepts.shape, dtype=torch.float32, device=intercepts.device)
        grad_slopes = torch.zeros_like(grad_intercepts)
        grad_row = torch.zeros(distance_row.shape, dtype=torch.float32, device=distance_row.device)
        grad_normaliser = torch.zeros(normaliser.shape, dtype=torch.float32, device=normaliser.device)
        blocks = PiecewiseFireBias.blocks(distance_row, normaliser, breakpoints, query_length, heads)
        for rows, x, piece in blocks:
            grad_x = torch.zeros_like(x)
            pieces = piece.flatten()
            for head in range(heads):
                grad = grad_bias[:, head, rows].float()  # (B, rows, K)
                grad_intercepts[head].index_add_(0, pieces, grad.flatten())
                grad_slopes[head].index_add_(0, pieces, (grad * x).flatten())
                grad_x += grad * slopes32[head][piece]
            scaled = grad_x / normaliser[:, rows, None]
            columns = distance_grid(query_length, x.shape[-1], x.device, rows).expand_as(scaled)
            grad_row.index_add_(0, columns.flatten(), scaled.flatten())
            grad_normaliser[:, rows] = -(scaled * x).sum(-1)
        return (grad_row.to(distance_row.dtype), grad_normaliser.to(normaliser.dtype), None,
                grad_intercepts.to(intercepts.dtype), grad_slopes.to(slopes.dtype), None, None)

    @staticmethod
    def blocks(distance_row, normaliser, breakpoints, query_length: int, heads: int):
        """(rows, x, piece) per block of query rows: the slice, the interpolated distances (B, rows, K) in fp32, and
        the piece of f each falls on."""
        key_length = distance_row.shape[0] - query_length + 1
        step = max(1, FIRE_BIAS_BLOCK // (normaliser.shape[0] * heads * key_length))
        row, norm = distance_row.detach().float(), normaliser.detach().float()
        for start in range(0, query_length, step):
            rows = slice(start, min(start + step, query_length))
            x = row[distance_grid(query_length, key_length, row.device, rows)] / norm[:, rows, None]
            yield rows, x, torch.bucketize(x, breakpoints.float())


@register_position_encoding("fire")
class FIREBias(ScoreBiasEncoding):
    """FIRE (Li et al., "Functional Interpolation for Relative Positions Improves Long Context Transformers", ICLR
    2024): b(i, j) = f_θ(ψ(i − j) / ψ(max(L, i))), ψ(x) = log(c·|x| + 1), f_θ an MLP with one ReLU layer.

    Dividing by ψ of the query position i maps every distance into [0, 1] (progressive interpolation), so long
    inputs reuse the range seen in training; L = |ℓ|·``fire_threshold`` keeps short prefixes from being stretched.
    c (from 0.1), ℓ (from 1) and θ are learned, as in the paper's pseudo-code. The bias depends on the query's
    position as well as the distance: eager/SDPA get the (B|1, H, Q, K) tensor, built and differentiated through its
    small factors (`PiecewiseFireBias`: no tensor per pair and hidden unit), flex a score function that evaluates the
    MLP unit by unit from (B|1, Q) positions and the weights (no (Q, K) tensor).
    """

    eps: ClassVar[float] = 1e-6
    config_fields = ("fire_mlp_width", "fire_threshold")
    per_head_tables = ("w2", "b2")  # the MLP's output layer; its first layer and ψ are shared by all heads

    @classmethod
    def validate_config(cls, config) -> None:
        require_positive(config, cls.config_fields, "position_encoding='fire'")

    def __init__(self, config, is_causal):
        if is_deepspeed_zero3_enabled():
            # DeepSpeed (0.19.8) broadcasts each new parameter as bytes (`view(torch.uint8)`), which a 0-d tensor
            # cannot give; making c and ℓ 1-d would break loading every FIRE checkpoint saved so far.
            raise ValueError(
                "position_encoding='fire' cannot be built under DeepSpeed ZeRO-3: its scalar parameters c and ℓ "
                "(distance_scale, threshold_scale) are 0-dimensional, which DeepSpeed's zero.Init cannot partition. "
                "Train 'fire' with FSDP2 (a `distributed:` mapping) or DDP; allowed under ZeRO-3 are the other "
                "position encodings."
            )
        super().__init__(config, is_causal)
        self.initial_threshold = config.fire_threshold
        self.mlp = nn.Sequential(nn.Linear(1, config.fire_mlp_width), nn.ReLU(), nn.Linear(config.fire_mlp_width, config.num_attention_heads))
        initial = self.initial_buffers()
        self.distance_scale = nn.Parameter(initial["distance_scale"])
        self.threshold_scale = nn.Parameter(initial["threshold_scale"])

    def initial_buffers(self):
        return {"distance_scale": torch.tensor(0.1), "threshold_scale": torch.tensor(1.0)}

    def score_bias(self, query_slots, key_slots, position_ids=None):
        if position_ids is None:
            position_ids = query_slots[None]
        first, second = self.mlp[0], self.mlp[2]
        tables = FireTables(
            positions=shared_positions(position_ids).float(),
            offset=(key_slots[0] - query_slots[0]).float(),
            c=self.distance_scale.abs(),
            threshold=(self.threshold_scale * self.initial_threshold).abs(),
            w1=first.weight[:, 0], b1=first.bias, w2=second.weight, b2=second.bias,
        )
        return ScoreBias(self, tables, query_slots.shape[0], key_slots.shape[0])

    @classmethod
    def distance_feature(cls, distance: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """ψ(|i − j|) = log(c·|i − j| + 1)."""
        return torch.log(c * distance.abs() + 1)

    @classmethod
    def normaliser(cls, query_position: torch.Tensor, c: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """ψ(max(L, i)), kept away from 0."""
        return torch.log(c * torch.maximum(query_position, threshold) + 1) + cls.eps

    @classmethod
    def interpolated_distance(
        cls, distance: torch.Tensor, query_position: torch.Tensor, c: torch.Tensor, threshold: torch.Tensor
    ) -> torch.Tensor:
        """ψ(|i − j|) / ψ(max(L, i)) with ψ(x) = log(c·x + 1)."""
        return cls.distance_feature(distance, c) / cls.normaliser(query_position, c, threshold)

    def materialise_bias(self, tables, query_length, key_length):
        # Column n of the row is the distance j − i = n − (Q − 1) + offset (`distance_grid`).
        relative = torch.arange(query_length + key_length - 1, device=tables.positions.device) - (query_length - 1)
        distance_row = self.distance_feature(relative + tables.offset, tables.c)  # (Q + K − 1,)
        normaliser = self.normaliser(tables.positions, tables.c, tables.threshold)  # (B|1, Q)
        pieces = fire_pieces(tables.w1, tables.b1, tables.w2, tables.b2)
        # The distances are computed in fp32 (positions and logs); the bias comes out in the weights' dtype.
        # (B|1, H, Q, K)
        return PiecewiseFireBias.apply(distance_row, normaliser, *pieces, query_length, tables.w2.dtype)

    def score_function(self, tables, query_length, key_length):
        width = tables.w1.shape[0]
        shared = tables.positions.shape[0] == 1  # one row of positions for the whole batch (position_ids (1, Q))

        def add_fire_bias(score, batch, head, query, key):
            position = tables.positions[0, query] if shared else tables.positions[batch, query]
            x = self.interpolated_distance(key - query + tables.offset, position, tables.c, tables.threshold)
            bias = tables.b2[head]
            for unit in range(width):  # the MLP, one hidden unit at a time: a score function sees scalars
                bias = bias + tables.w2[head, unit] * torch.relu(tables.w1[unit] * x + tables.b1[unit])
            return score + bias.to(score.dtype)

        return add_fire_bias


@register_position_encoding("cope")
class ContextualPositionEncoding(ContextualEncoding):
    """CoPE (Golovneva et al., "Contextual Position Encoding: Learning to Count What's Important", 2024): the position
    of key j for query i is a count of gates, p_ij = Σ over t from j to i of σ(q_i·k_t), and the score gains q_i·e[p_ij], with e
    interpolated between the two nearest of ``cope_max_positions`` learned embeddings.

    Positions depend on the content, so each attention layer computes them from its own queries and keys
    (``ContextualPositions``, owned by the layer as in the paper) and hands the kernel a (B, H, Q, K) bias: eager
    and SDPA carry it; flex cannot (its score function sees one score, not the row a cumulative sum needs) and is
    refused. A token's count reads only keys up to it, so a KV cache stays valid (cacheable, dynamic and static).
    Bidirectional models count the gates between the two tokens in either direction (|p| without a sign).
    """

    config_fields = ("cope_max_positions",)

    @classmethod
    def validate_config(cls, config) -> None:
        if config.cope_max_positions < 2:
            raise ValueError(
                f"cope_max_positions={config.cope_max_positions} must be at least 2 for position_encoding='cope' "
                "(positions are interpolated between two embeddings)."
            )

    @classmethod
    def layer_module(cls, config, is_causal):
        return ContextualPositions(config, is_causal)


class ContextualPositions(nn.Module):
    """One layer's CoPE: the (head_dim, P) position embeddings and the gated-count bias of its queries and keys."""

    def __init__(self, config, is_causal: bool):
        super().__init__()
        self.is_causal = is_causal
        self.head_dim, self.max_positions = config.head_dim, config.cope_max_positions
        self.embeddings = nn.Parameter(self.initial_buffers()["embeddings"])

    def initial_buffers(self) -> dict[str, torch.Tensor]:
        """Zero embeddings, as in the paper: CoPE starts as no position signal and learns one."""
        return {"embeddings": torch.zeros(self.head_dim, self.max_positions)}

    @staticmethod
    def gated_counts(gates: torch.Tensor, is_causal: bool) -> torch.Tensor:
        """p_ij = Σ_t g_it over t from j to i (either order), for (B, H, Q, K) gates that are 0 where masked."""
        if is_causal:  # keys after the query have gate 0: the paper's reversed cumulative sum
            return gates.flip(-1).cumsum(-1).flip(-1)
        totals = gates.cumsum(-1)  # without a cache Q == K, and query i is key i
        diagonal = torch.arange(gates.shape[-2], device=gates.device)[:, None]
        own_index = diagonal.expand(*gates.shape[:-1], 1)
        own_total, own_gate = totals.gather(-1, own_index), gates.gather(-1, own_index)  # (B, H, Q, 1)
        before = torch.arange(gates.shape[-1], device=gates.device)[None, :] <= diagonal  # (Q, K): j <= i
        return (totals - own_total).abs() + torch.where(before, gates, own_gate)

    def allowed_keys(self, attention_mask, query_length: int, key_length: int, device) -> torch.Tensor | None:
        """Boolean (.., Q, K) of the keys each query may see, or None when it may see all."""
        if isinstance(attention_mask, torch.Tensor):
            mask = attention_mask[:, :, :, :key_length]
            return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        if not self.is_causal or query_length == 1:
            return None
        # No mask with several queries: a prefill, queries at slots 0..Q-1 (an empty static cache is longer).
        return torch.arange(key_length, device=device)[None, :] <= torch.arange(query_length, device=device)[:, None]

    def forward(self, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float) -> torch.Tensor:
        """The CoPE bias (B, H, Q, K) for (B, H, Q, D) queries and keys (key heads already repeated)."""
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
        gates = torch.sigmoid(logits)
        allowed = self.allowed_keys(attention_mask, query.shape[2], key.shape[2], query.device)
        if allowed is not None:
            gates = gates.masked_fill(~allowed, 0.0)
        counts = self.gated_counts(gates, self.is_causal).clamp(max=self.max_positions - 1)
        per_position = torch.matmul(query.float(), self.embeddings.float())  # (B, H, Q, P): q_i·e[p] for integer p
        lower = counts.floor()
        below, above = per_position.gather(-1, lower.long()), per_position.gather(-1, counts.ceil().long())
        return below + (counts - lower) * (above - below)
