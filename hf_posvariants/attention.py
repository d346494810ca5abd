"""Self-attention of the posvariants family, dispatched through transformers' attention interface.

We ship one eager kernel, the reference: it understands an additive position bias and grouped KV
heads. SDPA (the default) and flex attention come from transformers' registry. Position arrives once
per forward as one `Positions` value: rotary (cos, sin) rotate queries and keys here; how a bias reaches the
kernel is its `route` (`bias_route.py`), decided once per forward: a bias shared by all layers rides in the
additive mask on eager and SDPA (the model folds it in) and reaches flex as a `score_mod` over small tables, so
the flex path never builds a (queries × keys) tensor. A layer's own bias (CoPE's counts, DeBERTa's position
terms) takes the same route. Layers hand the kernel runner one typed `KernelBias`; the runner only dispatches.
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention.flex_attention import flex_attention
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .bias_route import BiasRoute
from .position_encodings import POSITION_ENCODINGS, BiasColumns, Positions, ScoreMod, rotate


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
    weights = attention_weights(module, query, key, attention_mask, scaling, position_bias)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, repeat_kv(value, module.num_key_value_groups)).transpose(1, 2).contiguous()
    return output, weights


def attention_weights(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    position_bias: torch.Tensor | None = None,
    causal_without_mask: bool = False,
) -> torch.Tensor:
    """softmax(QKᵀ·scaling + position_bias + mask), (B, H, Q, K) in the query's dtype, for (B, H, Q, D) queries and
    (B, H_kv, K, D) keys. The mask is any a backend is handed: additive float, boolean (True: attend), or None:
    full attention, or causal with `causal_without_mask` (SDPA's `is_causal`), aligned so that the last query
    sees every key."""
    key = repeat_kv(key, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    query_length, key_length = scores.shape[-2:]
    if attention_mask is None and causal_without_mask and query_length > 1:
        query_slots = torch.arange(key_length - query_length, key_length, device=scores.device)
        attention_mask = torch.arange(key_length, device=scores.device)[None, :] <= query_slots[:, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :key_length], torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask[..., :key_length]
    return nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


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


def flex_kernel_options(query: torch.Tensor) -> dict | None:
    """Kernel options for flex attention with a score function, chosen here only.

    A score_mod that reads tables needing a gradient makes the backward kernel keep more per block;
    with the default blocks it exceeded the shared memory of Hopper GPUs (245,760 of 232,448 bytes
    for T5 at 8 × 2048 × 64). Smaller blocks compile there; the CPU kernels take no options.
    """
    if query.device.type != "cuda":
        return None
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2}


@functools.cache
def compiled_flex_attention(device_type: str) -> Callable:
    """flex_attention compiled once per device type. Static shapes on CPU: after a first compile, inductor's CPU
    code for a recompile with dynamic shapes failed to build (an undeclared `cur_qSplitSize` in the generated C++,
    torch 2.13), so each new shape compiles anew there; GPUs keep automatic dynamic shapes."""
    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def with_tensor_mask(score_mod: ScoreMod, attention_mask: torch.Tensor, key_length: int) -> ScoreMod:
    """Compose a boolean or additive (B, 1, Q, K) mask into a score function (flex without a block mask)."""
    mask = attention_mask[:, :, :, :key_length]

    def masked(score, batch, head, query, key):
        score = score_mod(score, batch, head, query, key)
        allowed = mask[batch, 0, query, key]
        if allowed.dtype == torch.bool:
            return torch.where(allowed, score, -float("inf"))
        return score + allowed

    return masked


def flex_score_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    score_mod: ScoreMod,
    scaling: float,
) -> tuple[torch.Tensor, None]:
    """flex_attention with a position score function: causal and padding structure come as the block mask
    that transformers' masking utilities build, the bias as `score_mod`; returns (B, T, H, D)."""
    block_mask = attention_mask if attention_mask is not None and not isinstance(attention_mask, torch.Tensor) else None
    if isinstance(attention_mask, torch.Tensor):
        score_mod = with_tensor_mask(score_mod, attention_mask, key.shape[-2])
    kernel = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention(query.device.type)
    output = kernel(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=block_mask,
        enable_gqa=query.shape[1] != key.shape[1],
        scale=scaling,
        kernel_options=flex_kernel_options(query),
    )
    return output.transpose(1, 2).contiguous(), None


# Elements of one (batch, heads, query rows, keys) block in the backward below: 2M floats, 8 MiB in fp32 (smaller blocks
# made the step slower on one thread: more, thinner products).
BIAS_GRADIENT_BLOCK = 1 << 21


def diagonal_sums(grad: torch.Tensor) -> torch.Tensor:
    """(H, rows, keys) → (H, rows + keys − 1): entry u sums the entries [t, u − (rows − 1) + t] over the rows t, so
    every entry is one key − query distance, from key 0 − last row (u = 0) to the last key − row 0."""
    heads, rows, keys = grad.shape
    # Flipped rows padded by `rows` zeros and read with a row length one shorter: row t moves right by rows − 1 − t.
    padded = nn.functional.pad(grad.flip(1), (0, rows)).flatten(1)[:, : rows * (keys + rows - 1)]
    return padded.view(heads, rows, keys + rows - 1).sum(1)


class FlashAttentionWithBiasGradient(torch.autograd.Function):
    """SDPA's CPU flash kernel for an additive mask carrying a learned position bias.

    Given a mask that needs a gradient, CPU SDPA falls back to its math kernel, which keeps the (B, H, Q, K)
    weights of every layer for the backward. Here the forward runs the flash kernel on the detached mask and
    keeps nothing of size Q × K; the backward recomputes the weights one block of queries at a time for dQ,
    dK, dV and dS = P ⊙ (dP − rowsum(dO ⊙ O)). dS goes either to the mask (summed over the batch where the
    mask is shared) or, given the per-distance `table` the mask was gathered from (`DistanceBias`), straight
    into that table's (H, Q + K − 1) gradient as sums along the block's diagonals, so no layer returns a (Q, K)
    gradient at all. `causal` (the mask is causality alone besides the bias, as many queries as keys) lets both
    passes skip the keys after each query and the backward rebuild P from the forward's log-sum-exp. Without it, P
    is recomputed by a softmax: the log-sum-exp rounds to the mask's minimum in fully masked rows, which would give
    weights of 1 there instead of the math kernel's 1/K (also why the flash kernel's own backward is not used).
    """

    @staticmethod
    def forward(ctx, query, key, value, mask, table, scale, causal=False):
        output, log_sum_exp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=mask.detach(), scale=scale
        )
        ctx.save_for_backward(query, key, value, mask, output, table, log_sum_exp)
        ctx.scale, ctx.causal = scale, causal
        return output

    @staticmethod
    def backward(ctx, grad_output):
        # Computed in fp32 on purpose: autocast (a backward called inside its region) would turn the products to bf16.
        with torch.autocast(grad_output.device.type, enabled=False):
            return FlashAttentionWithBiasGradient._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        query, key, value, mask, output, table, log_sum_exp = ctx.saved_tensors
        batch, heads, query_length, _ = query.shape
        key_length = key.shape[2]
        rows = max(1, BIAS_GRADIENT_BLOCK // (batch * heads * key_length))
        # (B·H, T, D) in fp32: three-dimensional products take transposed operands without copying them.
        query32, key32, value32, grad32 = (x.float().flatten(0, 1) for x in (query, key, value, grad_output))
        row_sums = (grad32 * output.float().flatten(0, 1)).sum(-1, keepdim=True)  # (B·H, Q, 1)
        log_sum_exp = log_sum_exp.float().flatten(0, 1).unsqueeze(-1)
        grad_query, grad_key, grad_value = torch.empty_like(query32), torch.zeros_like(key32), torch.zeros_like(value32)
        by_table = table.numel() > 0
        grad_bias = torch.zeros(table.shape if by_table else mask.shape, dtype=torch.float32, device=mask.device)
        reduce = [dim for dim in (0, 1) if mask.shape[dim] == 1 and query.shape[dim] > 1]
        blocked = torch.finfo(mask.dtype).min / 2
        for start in range(0, query_length, rows):
            stop = min(start + rows, query_length)
            keys = stop if ctx.causal else key_length  # causal: no query of the block sees a key after `stop`
            block, block_mask = slice(start, stop), mask[:, :, start:stop, :keys].float()
            scores = torch.bmm(query32[:, block], key32[:, :keys].transpose(1, 2)).mul_(ctx.scale)
            scores.view(batch, heads, stop - start, keys).add_(block_mask)
            weights = scores.sub_(log_sum_exp[:, block]).exp_() if ctx.causal else torch.softmax(scores, dim=-1)
            grad_scores = torch.bmm(grad32[:, block], value32[:, :keys].transpose(1, 2))
            grad_scores = grad_scores.sub_(row_sums[:, block]).mul_(weights)  # (B·H, rows, keys)
            grad_value[:, :keys].baddbmm_(weights.transpose(1, 2), grad32[:, block])
            grad_query[:, block] = torch.bmm(grad_scores, key32[:, :keys])
            grad_key[:, :keys].baddbmm_(grad_scores.transpose(1, 2), query32[:, block])
            grad_scores = grad_scores.view(batch, heads, stop - start, keys)
            if by_table:
                if not ctx.causal:
                    # Only where the bias entered the scores: blocked slots of fully masked rows still get weight 1/K.
                    grad_scores = grad_scores * (block_mask > blocked)
                # Rows `block` of `distance_grid`: column j of query row i reads table entry j - i + Q - 1.
                first = query_length - stop
                grad_bias[:, first : first + stop - start + keys - 1] += diagonal_sums(grad_scores.sum(0))
            else:
                grad_bias[:, :, block, :keys] = grad_scores.sum(dim=reduce, keepdim=True) if reduce else grad_scores
        grad_query.mul_(ctx.scale)
        grad_key.mul_(ctx.scale)
        grad_mask, grad_table = (None, grad_bias.to(table.dtype)) if by_table else (grad_bias.to(mask.dtype), None)
        grads = (grad.view(like.shape).to(like.dtype) for grad, like in zip((grad_query, grad_key, grad_value), (query, key, value)))
        return *grads, grad_mask, grad_table, None, None


def flash_attention_with_bias_gradient(
    module, query, key, value, attention_mask, row: torch.Tensor | None = None, causal: bool = False
) -> tuple[torch.Tensor, None]:
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # Clamped before the cast: float32's minimum is -inf in bf16, and a row of -inf (left padding) would make the
    # flash forward return zeros where the backward's softmax gives NaN; eager and the math kernel see 1/K weights.
    mask = attention_mask[:, :, :, : key.shape[-2]].clamp_min(torch.finfo(query.dtype).min).to(query.dtype)
    table = row if row is not None else query.new_empty(0)
    output = FlashAttentionWithBiasGradient.apply(query, key, value, mask, table, module.scaling, causal)
    return output.transpose(1, 2).contiguous(), None


def with_bias_columns(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, columns: BiasColumns, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, Q, D + 1) queries, (B, H_kv, K, D + 1) keys and values: the queries' extra column is the per-head factor
    over `scaling` and the keys' the per-key value (so QKᵀ·scaling gains the bias); the values' is zeros, as the
    kernels want equal widths (the output's extra column is zero)."""
    batch, heads, query_length, _ = query.shape
    per_head = (columns.per_head / scaling).to(query.dtype)[None, :, None, None]
    per_key = columns.per_key[: key.shape[2]].to(key.dtype)[None, None, :, None]
    query = torch.cat((query, per_head.expand(batch, heads, query_length, 1)), dim=-1)
    key = torch.cat((key, per_key.expand(*key.shape[:-1], 1)), dim=-1)
    return query, key, nn.functional.pad(value, (0, 1))


@dataclass
class KernelBias:
    """The position bias one kernel call receives, in the form its `route` gives (see `kernel_bias`).

    ``tensor``: a (B|1, H, Q, K) bias the kernel adds to the scores besides the mask (transformers' `position_bias`);
    ``score_mod``: flex's score function; ``row``: the (H, Q + K − 1) per-distance row that the gradient of a bias
    folded into the mask goes to (`route.gradient == "row"`); ``columns``: the shared bias as an extra query/key
    column (`route.columns`).
    """

    route: BiasRoute
    tensor: torch.Tensor | None = None
    score_mod: ScoreMod | None = None
    row: torch.Tensor | None = None
    columns: BiasColumns | None = None


def chained(first: ScoreMod | None, second: ScoreMod | None) -> ScoreMod | None:
    """One score function adding both biases (either may be None)."""
    if first is None or second is None:
        return first or second

    def both(score, batch, head, query, key):
        return second(first(score, batch, head, query, key), batch, head, query, key)

    return both


def kernel_bias(positions: Positions, own: torch.Tensor | ScoreMod | None = None) -> KernelBias:
    """What a kernel call receives of the shared bias and of the layer's `own` bias (a tensor where the route's carrier
    is the mask, a score function on flex), as `positions.route` says: a shared bias folded into the mask only as the
    row its gradient goes to, if any; one in columns as those columns."""
    route, shared = positions.route, positions.bias
    if route.carrier == "score_function":
        return KernelBias(route, score_mod=chained(None if shared is None else shared.score_mod(), own))
    columns = shared.columns() if route.columns else None
    return KernelBias(route, tensor=own, row=shared.row if route.gradient == "row" else None, columns=columns)


def run_attention_kernel(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    bias: KernelBias,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel `bias` names, on (B, H, T, D) heads: a score function goes to flex, a route with the gradient kernel
    to `FlashAttentionWithBiasGradient`, anything else through transformers' attention interface (a bias tensor as
    its `position_bias`, bias columns appended to the heads and cut from the output). It decides nothing itself."""
    if bias.score_mod is not None:
        return flex_score_attention(module, query, key, value, attention_mask, bias.score_mod, module.scaling)
    if bias.route.gradient_kernel:
        return flash_attention_with_bias_gradient(module, query, key, value, attention_mask, bias.row, bias.route.causal)
    if bias.tensor is not None:
        kwargs["position_bias"] = bias.tensor
    width = value.shape[-1]
    if bias.columns is not None:
        query, key, value = with_bias_columns(query, key, value, bias.columns, module.scaling)
    output, weights = attention_function(module)(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=module.attention_dropout if module.training else 0.0,
        scaling=module.scaling,
        **kwargs,
    )
    return output[..., :width], weights


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

    Position enters as rotary (cos, sin) applied to queries and keys, or as an additive score bias: inside
    the mask (eager, SDPA) or as a flex score function. ``backends`` declares the attention implementations
    the variant can run (None: every one), ``config_fields`` the fields it owns; ``relative_encoding_name``
    names the ``relative`` position encoding a variant consumes (none for most).
    """

    backends: tuple[str, ...] | None = None
    config_fields: tuple[str, ...] = ()  # the config fields only this variant reads (flat, as in config.json)

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
        encoding = POSITION_ENCODINGS[config.layer_position_encoding(layer_idx)]
        self.contextual_positions: nn.Module | None = encoding.layer_module(config, is_causal)

    @classmethod
    def validate_config(cls, config) -> None:
        """Refuse settings this variant cannot run (called by the config's validation); none here."""

    @classmethod
    def relative_encoding_name(cls, config) -> str | None:
        """The `relative` position encoding this variant reads from `Positions.relative` under `config`, if any."""
        return None

    def init_variant_weights(self) -> None:
        """Initialise parameters beyond the projections (called by `_init_weights`); none here."""

    def project(
        self,
        hidden_states: torch.Tensor,
        positions: Positions,
        cache: Cache | None,
        key_value_states: torch.Tensor | None = None,
        cache_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, Q, D) and keys/values (B, H_kv, K, D), rotated and cached; keys and values come from
        `key_value_states` when given (DeBERTa's Enhanced Mask Decoder). `cache_kwargs` are the layer's keyword
        arguments: a paged cache (continuous batching) reads its slot indices there and updates them in place."""
        source = hidden_states if key_value_states is None else key_value_states
        query = self.q_proj(hidden_states).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        key = self.k_proj(source).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        value = self.v_proj(source).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        if positions.rotary is not None:
            query, key = rotate(query, *positions.rotary), rotate(key, *(positions.key_rotary or positions.rotary))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs={} if cache_kwargs is None else cache_kwargs)
        return query, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: Positions,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self.project(hidden_states, positions, cache, cache_kwargs=kwargs)
        bias = kernel_bias(positions, self.contextual_bias(query, key, attention_mask))
        return self.attend(query, key, value, attention_mask, bias, **kwargs)

    def contextual_bias(self, query: torch.Tensor, key: torch.Tensor, attention_mask) -> torch.Tensor | None:
        """For a layer with contextual positions (CoPE): their (B, H, Q, K) bias, computed from these very queries and
        keys (in the kernel's head order); else None."""
        if self.contextual_positions is None:
            return None
        bias = self.contextual_positions(query, repeat_kv(key, self.num_key_value_groups), attention_mask, self.scaling)
        return bias.to(query.dtype)

    def adds_own_bias(self) -> bool:
        """Whether the layer adds a bias of its own beside the shared one (CoPE's counts here; DeBERTa's position
        terms), which keeps the kernel call on its backend's own mask path."""
        return self.contextual_positions is not None

    def has_own_kernel(self) -> bool:
        """Whether the layer adds its own bias and attends in a fused CPU kernel of its own where the route says
        (`BiasRoute.own_kernel`, read by `choose_bias_route`); none here."""
        return False

    def takes_gradient_kernel(self, score_elements: int, device_type: str) -> bool:
        """Whether this layer's kernel call can be `FlashAttentionWithBiasGradient`, which takes the mask alone (read by
        `choose_bias_route` for a (B, H, Q, K) score tensor of `score_elements`)."""
        return not self.adds_own_bias()

    def takes_bias_columns(self) -> bool:
        """Whether this layer's kernel call can take the shared bias as an extra query/key column (`BiasRoute.columns`,
        read by `choose_bias_route`)."""
        return not self.adds_own_bias()

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        bias: KernelBias,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The backend's kernel on (B, H, T, D) heads, then the output projection back to (B, T, hidden)."""
        output, weights = run_attention_kernel(self, query, key, value, attention_mask, bias, **kwargs)
        if torch.compiler.is_exporting():
            # torch.export drops the kernel's own contiguous() (a no-op when traced), and SDPA's decomposition with a
            # float mask then returns transposed strides that cannot be viewed as (B, T, hidden); copy explicitly.
            output = output.clone(memory_format=torch.contiguous_format)
        return self.o_proj(output.flatten(2)), weights
