"""Differential attention (Ye et al., "Differential Transformer", ICLR 2025), a variant of the shared core.

Every differential head owns two query/key groups and one value of width 2d; it subtracts two softmax maps
    DiffAttn(X) = (softmax(Q1·K1ᵀ/√d) − λ·softmax(Q2·K2ᵀ/√d))·V,  λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init,
then normalises its output with a per-head RMSNorm ("GroupNorm") and scales it by the fixed (1 − λ_init).

`config.num_attention_heads` counts softmax maps, so a model has num_attention_heads / 2 differential heads:
with the baseline's head count, projections and parameters equal the baseline's, and the differential heads
are half as many as the baseline's heads, which is how the paper matches parameters.

Two head layouts say which projected heads form a pair (`config.differential_head_layout`):
- "pairs" (the reference code): query heads 2i and 2i+1 are the two maps of differential head i, KV heads
  2m and 2m+1 are its two keys and the two halves of its value;
- "halves" (transformers' `diffllama`): query head i and head i + H/2 are the two maps, KV heads m and
  m + H_kv/2 the two keys and value halves.
An additive position bias has one slice per softmax map, in the layout's own head order (also when the
model has folded it into the mask); it reaches the kernels by the route of `Positions`, like any layer's.

The kernels are transformers' attention interface, so eager, SDPA, flex and flash all work, with grouped KV
heads and every position encoding. On eager and SDPA the maps are computed here, once, and subtracted before they
meet the value, which halves the value matmul: whole where they are small, else one block of query rows at a time,
recomputed in the backward (`BlockwiseSubtractedMaps`: memory linear in the length). Otherwise each pair's two maps
meet its 2d-wide value in one kernel call with zero-padded queries and keys (kernels need equal widths), or in two
calls, one per value half. `KERNEL_CALL_CHOICES` picks per backend, device and size, and the paths agree to
float rounding.

`output_attentions=True` returns, per layer, (B, num_attention_heads, Q, K): every softmax map, the first
maps of the H/2 differential heads followed by their second maps (whatever the head layout), i.e. the
kernel's own tensor. `DifferentialAttention.differential_map` turns it into the H/2 maps softmax₁ − λ·softmax₂.
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation.continuous_batching import PagedAttentionCache

from .attention import (
    KernelBias,
    PosVarAttention,
    attention_weights,
    kernel_bias,
    register_attention_variant,
    repeat_kv,
    run_attention_kernel,
)
from .bias_route import (
    BACKEND_BIAS,
    FUSED_MASK_BACKENDS,
    MASK_BIAS_BACKENDS,
    OPEN_MASK_BACKENDS,
    PAGED_CACHE_LAYER_BACKENDS,
    BiasRoute,
)
from .position_encodings import Positions

HEAD_LAYOUTS = ("pairs", "halves")

# How the two maps of every pair reach the pair's 2d-wide value:
#   "subtracted_maps": the maps materialised (eager's maths), QKᵀ and softmax once, and softmax₁ − λ·softmax₂ meets
#                  the value: half the value matmul of every other path, but (B, H, Q, K) scores in memory;
#   "padded_call": one kernel call with the two value halves side by side (2d wide) and queries and keys zero-padded
#                  to 2d, as kernels need equal widths: the matmul flops of two calls, but exp/softmax and the
#                  kernel's passes run once;
#   "two_calls":   one call per d-wide value half, each computing QKᵀ and both softmaxes again;
#   "blockwise_maps": the subtracted maps one block of query rows at a time, recomputed in the backward
#                  (`BlockwiseSubtractedMaps`): their flops with memory linear in the length, and causal blocks above
#                  the diagonal skipped.
KERNEL_CALLS = ("subtracted_maps", "blockwise_maps", "padded_call", "two_calls")
MAPS_COMPUTED_HERE = ("subtracted_maps", "blockwise_maps")  # eager's maths, no kernel call

# (backend, device type) → the paths that measured fastest there, each with the largest score tensor (B·H·Q·K
# elements, None: any) it is chosen for; the first that fits is taken. Absent pairs take "two_calls", which every
# kernel runs. Measured on one CPU thread: forward and backward of the attention alone, 4 × 4 maps of width 64,
# and the training step of `scripts/bench.py --case-set differential` (hidden 256, 4 layers, batch 4 × 256).
KERNEL_CALL_CHOICES: dict[tuple[str, str], tuple[tuple[str, int | None], ...]] = {
    # Eager materialises the maps anyway: subtracting them first saves half the value matmul on any device.
    **{(backend, device): (("subtracted_maps", None),) for backend in OPEN_MASK_BACKENDS for device in ("cpu", "cuda")},
    # CPU: from 512 Ki score elements the blockwise maps beat every other path: forward + backward of the attention
    # alone took 0.59× the materialised maps' time at 2 × 256 tokens, 0.68× at 4 × 256, 0.42× at 8 × 512 and 0.27×
    # at 4 × 1,024 (203 against 748 ms), and 0.52× / 0.63× the padded flash call's at 8 × 512 / 4 × 1,024. At 256 Ki
    # (4 × 128) the materialised maps were faster (9.4 against 11.0 ms: per-block overhead), as for one query.
    # CPU flash needs equal widths (a 2d-wide value falls back to the math kernel), hence no wide-value call here.
    **{(backend, "cpu"): (("subtracted_maps", 2**18), ("blockwise_maps", None)) for backend in FUSED_MASK_BACKENDS},
    # CUDA: a wider value leaves flash and cuDNN for the memory-efficient kernel (transformers measured two
    # calls ~30% faster than that, DiffLlamaAttention); padded_call keeps flash at 2d. Not measured here yet.
    **{(backend, "cuda"): (("two_calls", None),) for backend in FUSED_MASK_BACKENDS},
}


def choose_kernel_calls(backend: str, device_type: str, score_elements: int = 0) -> str:
    """The kernel path (one of `KERNEL_CALLS`) of differential attention on `backend` and `device_type` for a
    (B, H, Q, K) score tensor of `score_elements`."""
    for path, limit in KERNEL_CALL_CHOICES.get((backend, device_type), (("two_calls", None),)):
        if limit is None or score_elements <= limit:
            return path
    return "two_calls"


def depth_lambda_init(layer_idx: int) -> float:
    """The paper's λ_init = 0.8 − 0.6·exp(−0.3·(l − 1)) for the 1-based layer l = layer_idx + 1."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


@register_attention_variant("differential")
class DifferentialAttention(PosVarAttention):
    """Differential attention (Ye et al., "Differential Transformer", ICLR 2025): the difference of two softmax
    maps cancels attention noise shared by both; q/k/v/o projections are those of standard attention."""

    # The kernel runs twice per layer under one layer_idx, which only kernels that leave the KV cache to the layer
    # can take. transformers' own (the rows of BACKEND_BIAS) do, except that flash writes
    # continuous batching's paged cache itself: with a paged cache only `paged_cache_backends` run. Any other
    # registered kernel (vLLM's Transformers backend, a hub kernel) may write its engine's cache, and is refused.
    kernel_backends: tuple[str, ...] = tuple(BACKEND_BIAS)
    paged_cache_backends: tuple[str, ...] = PAGED_CACHE_LAYER_BACKENDS
    config_fields = (
        "differential_head_layout", "differential_norm_affine", "differential_lambda_init", "differential_lambda_std"
    )

    def __init__(self, config, layer_idx: int, is_causal: bool):
        super().__init__(config, layer_idx, is_causal)
        self.head_layout = config.differential_head_layout
        self.lambda_std = config.differential_lambda_std
        if config.differential_lambda_init is None:
            self.lambda_init = depth_lambda_init(layer_idx)
        else:
            self.lambda_init = config.differential_lambda_init
        self.kernel_calls: str | None = None  # one of KERNEL_CALLS forces that path (tests, benchmarks)
        self.lambda_q1 = nn.Parameter(torch.zeros(self.head_dim))
        self.lambda_k1 = nn.Parameter(torch.zeros(self.head_dim))
        self.lambda_q2 = nn.Parameter(torch.zeros(self.head_dim))
        self.lambda_k2 = nn.Parameter(torch.zeros(self.head_dim))
        self.groupnorm = nn.RMSNorm(
            2 * self.head_dim, eps=config.norm_eps, elementwise_affine=config.differential_norm_affine
        )

    @classmethod
    def validate_config(cls, config) -> None:
        if config.differential_head_layout not in HEAD_LAYOUTS:
            raise ValueError(
                f"differential_head_layout={config.differential_head_layout!r} is not supported; "
                f"allowed values are {list(HEAD_LAYOUTS)}."
            )
        for field in ("num_attention_heads", "num_key_value_heads"):
            if getattr(config, field) % 2:
                raise ValueError(
                    f"{field}={getattr(config, field)} must be even for attention_variant='differential': "
                    "each differential head takes two query heads and two key/value heads."
                )
        if config.attention_dropout:
            raise ValueError(
                f"attention_dropout={config.attention_dropout} is not supported with attention_variant="
                "'differential'; allowed value is 0.0. The two softmax maps are computed by two kernel calls "
                "that cannot share a dropout mask, and the paper defines none; use hidden_dropout instead."
            )
        lambda_init = config.differential_lambda_init
        if lambda_init is not None and not 0.0 <= lambda_init < 1.0:
            raise ValueError(
                f"differential_lambda_init={lambda_init} must lie in [0, 1) (the output is scaled by "
                "1 − λ_init), or be None for the paper's depth schedule 0.8 − 0.6·exp(−0.3·(l − 1))."
            )

    def init_variant_weights(self) -> None:
        for vector in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            init.normal_(vector, mean=0.0, std=self.lambda_std)

    def differential_lambda(self) -> torch.Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, a scalar per layer.

        Computed in fp64: besides the precision, the cast copies the vectors to fresh memory, and fp32 dot
        products on CPU vary in the last bit with the address alignment of their operands (a model loaded
        from safetensors then differed from the one saved).
        """
        first = torch.exp(torch.dot(self.lambda_q1.double(), self.lambda_k1.double()))
        second = torch.exp(torch.dot(self.lambda_q2.double(), self.lambda_k2.double()))
        return (first - second + self.lambda_init).float()

    def split_pair(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, ...) → the first and second member of every head pair, each (B, H/2, ...)."""
        if self.head_layout == "halves":
            return states.chunk(2, dim=1)
        pairs = states.unflatten(1, (-1, 2))  # (B, H/2, 2, ...)
        return pairs[:, :, 0], pairs[:, :, 1]

    def maps_first(self, states: torch.Tensor) -> torch.Tensor:
        """Reorder heads as [all first maps, all second maps], so that the kernels' grouped-KV rule
        (query head j reads KV head j // groups) pairs each map with its own key."""
        if self.head_layout == "halves":
            return states
        return torch.cat(self.split_pair(states), dim=1)


    def differential_map(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, H, Q, K) softmax maps as `output_attentions` returns them → (B, H/2, Q, K) differential maps
        softmax₁ − λ·softmax₂ (rows sum to 1 − λ)."""
        first, second = weights.chunk(2, dim=1)
        return first - self.differential_lambda().to(weights.dtype) * second

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: Positions,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.check_backend(cache)
        query, key, value = self.project(hidden_states, positions, cache, cache_kwargs=kwargs)
        query, key = self.maps_first(query), self.maps_first(key)  # (B, H, Q, d), (B, H_kv, K, d)
        if positions.route.folded:  # the shared bias in the mask has the model's head order
            attention_mask = self.maps_first(attention_mask)
        bias = self.in_kernel_order(kernel_bias(positions), query.shape[1], query.device)
        bias.tensor = self.contextual_bias(query, key, attention_mask)  # once, for every kernel call of the layer
        lam = self.differential_lambda().to(query.dtype)
        difference, weights = self.attend_pairs(query, key, value, attention_mask, lam, bias, **kwargs)
        output = self.groupnorm(difference) * (1.0 - self.lambda_init)
        output = self.o_proj(output.reshape(*hidden_states.shape[:-1], -1))
        return output, weights  # weights: the kernel's own maps, so a gradient reaches them

    def check_backend(self, cache: Cache | None) -> None:
        """Refuse a kernel that may write a KV cache itself, and a paged cache (continuous batching) on a backend
        whose kernel writes it."""
        backend = self.config._attn_implementation
        if backend not in self.kernel_backends:
            raise ValueError(
                f"attn_implementation={backend!r} is not supported by attention_variant='differential': it calls the "
                "kernel twice per layer under one layer_idx, so a kernel that writes its own KV cache (as an "
                "engine's paged attention does) would write it twice; allowed backends are "
                f"{list(self.kernel_backends)}."
            )
        if isinstance(cache, PagedAttentionCache) and backend not in self.paged_cache_backends:
            raise ValueError(
                f"attn_implementation={backend!r} writes the paged KV cache of continuous batching inside the kernel, "
                "and differential attention calls the kernel twice per layer under one layer_idx, so the cache would "
                f"be written twice; allowed backends with a paged "
                f"cache are {list(self.paged_cache_backends)}, and every backend runs with generate()'s caches."
            )

    def chosen_path(self, score_elements: int, device_type: str) -> str:
        """`self.kernel_calls` when set (tests, benchmarks), else `choose_kernel_calls` for a (B, H, Q, K) score tensor
        of `score_elements` on `device_type`."""
        return self.kernel_calls or choose_kernel_calls(self.config._attn_implementation, device_type, score_elements)

    def takes_gradient_kernel(self, score_elements: int, device_type: str) -> bool:
        # The subtracted maps are computed here (eager's maths): a learned bias folded into the mask keeps its gradient.
        path = self.chosen_path(score_elements, device_type)
        return super().takes_gradient_kernel(score_elements, device_type) and path not in MAPS_COMPUTED_HERE

    def takes_bias_columns(self) -> bool:
        # The kernel sees the heads reordered (`maps_first`) and, on some paths, padded or not at all (the maps here).
        return False

    def kernel_path(self, query: torch.Tensor, key: torch.Tensor, route: BiasRoute) -> str:
        """The path of `chosen_path` for this call, checked against `KERNEL_CALLS` and the bias route."""
        score_elements = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2]
        path = self.chosen_path(score_elements, query.device.type)
        if path not in KERNEL_CALLS:
            raise ValueError(f"kernel_calls={path!r} is not a differential kernel path; allowed: {list(KERNEL_CALLS)}.")
        # The subtracted maps reproduce the backends whose bias rides in the mask, never a flex score function.
        if path in MAPS_COMPUTED_HERE and route.carrier != "mask":
            raise ValueError(
                f"kernel_calls={path!r} computes the maps itself, which attn_implementation="
                f"{self.config._attn_implementation!r} would not; allowed backends are {list(MASK_BIAS_BACKENDS)}."
            )
        return path

    def attend_pairs(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, lam: torch.Tensor,
        bias: KernelBias, **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(softmax₁ − λ·softmax₂)·V for every pair and its 2d-wide value, by the path of `kernel_path`.

        Takes maps-first queries/keys (B, H, Q, d), (B, H_kv, K, d) and the projected values (B, H_kv, K, d);
        returns the differences (B, Q, H/2, 2d) and the maps (B, H, Q, K) or None.
        """
        path = self.kernel_path(query, key, bias.route)
        value_halves = self.split_pair(value)
        if path == "two_calls":  # one call per value half: each computes QKᵀ and both maps again, on equal widths
            outputs = []
            for value_half in value_halves:
                both_maps_value = torch.cat((value_half, value_half), dim=1)
                output, weights = run_attention_kernel(self, query, key, both_maps_value, attention_mask, bias, **kwargs)
                outputs.append(output)  # (B, Q, H, d)
            first, second = torch.cat(outputs, dim=-1).chunk(2, dim=2)
            return first - lam * second, weights
        # The value of KV pair m is its two value heads side by side, (B, H_kv/2, K, 2d).
        wide_value = torch.cat(value_halves, dim=-1)
        if path == "subtracted_maps":
            return self.subtract_maps(query, key, wide_value, attention_mask, lam, bias.tensor)
        if path == "blockwise_maps":
            return self.subtract_maps_blockwise(query, key, wide_value, attention_mask, lam, bias.tensor), None
        # padded_call: zero columns add nothing to QKᵀ; `scaling` stays that of width d.
        query, key = F.pad(query, (0, self.head_dim)), F.pad(key, (0, self.head_dim))
        # Both maps of a pair read its value, so it is tiled over the first- and second-map KV heads.
        output, weights = run_attention_kernel(
            self, query, key, torch.cat((wide_value, wide_value), dim=1), attention_mask, bias, **kwargs
        )  # (B, Q, H, 2d)
        first, second = output.chunk(2, dim=2)
        return first - lam * second, weights

    def subtract_maps(
        self, query: torch.Tensor, key: torch.Tensor, wide_value: torch.Tensor, attention_mask, lam: torch.Tensor,
        position_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The maps of every head (B, H, Q, K), then (softmax₁ − λ·softmax₂) of each pair times its value."""
        weights = attention_weights(self, query, key, attention_mask, self.scaling, position_bias,
                                    causal_without_mask=self.causal_without_mask())
        first, second = weights.chunk(2, dim=1)  # (B, H/2, Q, K) each
        # First-map head j reads KV pair j // groups, as the kernels' grouped-KV rule does.
        difference = torch.matmul(first - lam * second, repeat_kv(wide_value, self.num_key_value_groups))
        return difference.transpose(1, 2), weights

    def subtract_maps_blockwise(
        self, query: torch.Tensor, key: torch.Tensor, wide_value: torch.Tensor, attention_mask, lam: torch.Tensor,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`subtract_maps` by `BlockwiseSubtractedMaps`: the same differences (B, Q, H/2, 2d), no maps kept."""
        mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]
        return BlockwiseSubtractedMaps.apply(query, key, wide_value, lam, mask, position_bias, self.scaling,
                                             self.causal_without_mask())

    def causal_without_mask(self) -> bool:
        """Whether, handed no mask, the backend these maps stand in for applies causality itself (SDPA's `is_causal`):
        so must the maps computed here."""
        backend = BACKEND_BIAS.get(self.config._attn_implementation)
        return self.is_causal and backend is not None and backend.causal_without_mask

    def in_kernel_order(self, bias: KernelBias, heads: int, device: torch.device) -> KernelBias:
        """The shared bias (a score function, or the row of a bias folded into the reordered mask) seen from the
        kernel's [first maps, second maps] order of the layer's `heads` query heads (a tensor-parallel rank's)."""
        row = None if bias.row is None else self.maps_first(bias.row[None])[0]
        if bias.score_mod is None:
            return dataclasses.replace(bias, row=row)
        in_config_order = bias.score_mod
        config_head = self.maps_first(torch.arange(heads, device=device)[None])[0]

        def reordered(score, batch, head, query, key):
            return in_config_order(score, batch, config_head[head], query, key)

        return dataclasses.replace(bias, row=row, score_mod=reordered)


# Elements of one block of scores in the blockwise path (batch rows × H maps × query rows × keys): 512 Ki floats,
# 2 MiB in fp32, so that a block's softmax and the passes over it stay in a core's cache. Measured on one CPU
# thread (4 × 4 maps × 1,024 × 64, causal, forward + backward): 169 ms at 512 Ki, 180 ms at 256 Ki, 196 ms at 1 Mi.
BLOCK_ELEMENTS = 1 << 19
# Causal, a batch row's queries come in at least this many blocks, so that the keys above the diagonal are skipped
# even where one block could hold them all (3/8 of the scores with four): 4 × 256 tokens took 23 ms instead of 31.
CAUSAL_ROW_BLOCKS = 4

Block = tuple[slice, slice, int]  # batch rows, query rows, the keys they see (a prefix)


def score_blocks(batch: int, heads: int, query_length: int, key_length: int, causal: bool) -> list[Block]:
    """The blocks of `BlockwiseSubtractedMaps`, each about `BLOCK_ELEMENTS` scores. Causal: the queries are the last
    `query_length` keys, so query row i sees keys up to i + key_length − query_length and later keys are skipped."""
    rows = min(query_length, max(1, BLOCK_ELEMENTS // (heads * key_length)))
    if causal:  # blocks of at least 16 rows: short inputs stay whole
        rows = min(rows, max(16, -(-query_length // CAUSAL_ROW_BLOCKS)))
    batch_rows = max(1, BLOCK_ELEMENTS // (heads * key_length * rows))
    return [
        (slice(first, first + batch_rows), slice(start, min(start + rows, query_length)),
         key_length - query_length + min(start + rows, query_length) if causal else key_length)
        for first in range(0, batch, batch_rows) for start in range(0, query_length, rows)
    ]  # fmt: skip


def block_of(tensor: torch.Tensor, block: Block) -> torch.Tensor:
    """One block of a (B|1, H|1, Q, K) mask or bias; a broadcast batch dimension stays whole."""
    batch, rows, key_end = block
    return tensor[batch if tensor.shape[0] > 1 else slice(None), :, rows, :key_end]


def grouped(states: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(b, H, R, X) → (b, H_kv, groups·R, X): the query heads of each KV head stacked, as its matmuls take them."""
    return states.reshape(states.shape[0], kv_heads, -1, states.shape[-1])


def ungrouped(states: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `grouped`: (b, H_kv, groups·R, X) → (b, H, R, X)."""
    return states.reshape(states.shape[0], heads, -1, states.shape[-1])


def block_maps(
    scaled_query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None,
    block: Block, causal: bool,
) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale + bias + mask) of every map in one block (b, H, rows, keys), fp32, as eager computes it."""
    batch, rows, key_end = block
    scores = ungrouped(
        torch.matmul(grouped(scaled_query[batch, :, rows], key.shape[1]), key[batch, :, :key_end].transpose(-1, -2)),
        scaled_query.shape[1],
    )
    if bias is not None:
        scores += block_of(bias, block)
    if causal:  # the block's last keys are the diagonal square; those above it are masked
        width = rows.stop - rows.start
        above = torch.ones(width, width, dtype=torch.bool, device=scores.device).triu_(1)
        scores[..., key_end - width :].masked_fill_(above, -math.inf)
    elif mask is not None and mask.dtype == torch.bool:
        scores.masked_fill_(~block_of(mask, block), torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores += block_of(mask, block)
    return torch.softmax(scores, dim=-1)


def subtracted(maps: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """softmax₁ − λ·softmax₂ of maps-first (b, H, rows, keys) → (b, H/2, rows, keys); λ a tensor: no host sync."""
    first, second = maps.chunk(2, dim=1)
    return torch.addcmul(first, second, lam, value=-1)


def add_block_gradient(gradient: torch.Tensor, block_gradient: torch.Tensor, block: Block) -> None:
    """Add a block's score gradient to that of a (B|1, H|1, Q, K) mask or bias, summed where it is broadcast."""
    reduce = [dim for dim in (0, 1) if gradient.shape[dim] == 1 and block_gradient.shape[dim] > 1]
    block_of(gradient, block).add_(block_gradient.sum(reduce, keepdim=True) if reduce else block_gradient)


class BlockwiseSubtractedMaps(torch.autograd.Function):
    """(softmax₁ − λ·softmax₂)·V of every differential head, one block of query rows (`score_blocks`) at a time.

    The flops of the subtracted maps (QKᵀ and softmax once per map, one value matmul per pair: half the value matmul
    of the kernel paths) with memory linear in the length: the forward keeps nothing of size Q × K, and the backward
    recomputes each block's maps for dV, dλ and dS = P ⊙ (dP − rowsum(dP ⊙ P)) of each map, where dP₁ = dD and
    dP₂ = −λ·dD for dD = dO·Vᵀ. Causal without a mask (SDPA's `is_causal`), keys above the diagonal are skipped;
    given a mask, every key is scored, so fully masked rows get the uniform weights of eager and SDPA.

    Takes maps-first queries (B, H, Q, d), keys (B, H_kv, K, d), pair values (B, H_kv/2, K, 2d), λ, the backend's
    mask (boolean, additive float, or None) and the layer's own (B, H, Q, K) bias or None, both cut to K keys;
    returns (B, Q, H/2, 2d). The mask and the bias get their gradients where they need one.
    """

    @staticmethod
    def forward(ctx, query, key, wide_value, lam, mask, bias, scale, causal):
        scaled_query, key32, value32 = query.float() * scale, key.float(), wide_value.float()
        bias32, lam32 = None if bias is None else bias.float(), lam.float()
        batch, heads, query_length, _ = query.shape
        causal = causal and mask is None
        output = value32.new_empty(batch, query_length, heads // 2, value32.shape[-1])
        for block in score_blocks(batch, heads, query_length, key.shape[2], causal):
            rows_batch, rows, key_end = block
            difference = subtracted(block_maps(scaled_query, key32, mask, bias32, block, causal), lam32)
            pair_output = torch.matmul(grouped(difference, key.shape[1] // 2), value32[rows_batch, :, :key_end])
            output.transpose(1, 2)[rows_batch, :, rows] = ungrouped(pair_output, heads // 2)
        ctx.save_for_backward(scaled_query, key32, value32, lam, mask, bias32)
        ctx.scale, ctx.causal = scale, causal
        ctx.dtypes = query.dtype, key.dtype, wide_value.dtype, None if bias is None else bias.dtype
        return output.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        scaled_query, key, value, lam, mask, bias = ctx.saved_tensors
        batch, heads, query_length, _ = scaled_query.shape
        grad_output = grad_output.float().transpose(1, 2)  # (B, H/2, Q, 2d)
        grad_query, grad_key = torch.empty_like(scaled_query), torch.zeros_like(key)
        grad_value, grad_lam = torch.zeros_like(value), torch.zeros((), dtype=torch.float64, device=lam.device)
        grad_mask = torch.zeros_like(mask, dtype=torch.float32) if ctx.needs_input_grad[4] else None
        grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[5] else None
        for block in score_blocks(batch, heads, query_length, key.shape[2], ctx.causal):
            rows_batch, rows, key_end = block
            block_query, block_key, block_value, block_lam, grad_scores = block_backward(
                scaled_query, key, value, lam.float(), mask, bias, grad_output, block, ctx.causal
            )
            grad_query[rows_batch, :, rows] = block_query
            grad_key[rows_batch, :, :key_end] += block_key
            grad_value[rows_batch, :, :key_end] += block_value
            grad_lam += block_lam
            for gradient in (grad_mask, grad_bias):
                if gradient is not None:
                    add_block_gradient(gradient, grad_scores, block)
        query_dtype, key_dtype, value_dtype, bias_dtype = ctx.dtypes
        return (
            (grad_query * ctx.scale).to(query_dtype), grad_key.to(key_dtype), grad_value.to(value_dtype),
            grad_lam.to(lam.dtype), None if grad_mask is None else grad_mask.to(mask.dtype),
            None if grad_bias is None else grad_bias.to(bias_dtype), None, None,
        )  # fmt: skip


def block_backward(
    scaled_query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor | None,
    bias: torch.Tensor | None, grad_output: torch.Tensor, block: Block, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's share of `BlockwiseSubtractedMaps`' gradients, from its recomputed maps: dQ of its query rows
    (before the scale), dK and dV over the keys it sees, dλ, and dS (b, H, rows, keys), which the mask and bias take."""
    rows_batch, rows, key_end = block
    heads, kv_heads = scaled_query.shape[1], key.shape[1]
    maps = block_maps(scaled_query, key, mask, bias, block, causal)
    block_grad = grouped(grad_output[rows_batch, :, rows], kv_heads // 2)
    difference = grouped(subtracted(maps, lam), kv_heads // 2)
    grad_value = torch.matmul(difference.transpose(-1, -2), block_grad)
    grad_difference = torch.matmul(block_grad, value[rows_batch, :, :key_end].transpose(-1, -2))  # dD
    grad_lam = maps_to_score_gradient(maps, ungrouped(grad_difference, heads // 2), lam)
    if mask is not None and mask.dtype == torch.bool:  # slots a boolean mask fills pass no gradient back
        maps.masked_fill_(~block_of(mask, block), 0.0)
    grouped_scores = grouped(maps, kv_heads)  # now dS
    grad_query = ungrouped(torch.matmul(grouped_scores, key[rows_batch, :, :key_end]), heads)
    grad_key = torch.matmul(grouped_scores.transpose(-1, -2), grouped(scaled_query[rows_batch, :, rows], kv_heads))
    return grad_query, grad_key, grad_value, grad_lam, maps


def maps_to_score_gradient(maps: torch.Tensor, grad_difference: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Turn maps-first maps (b, H, rows, keys) into their score gradients in place, dS = P ⊙ (dP − rowsum(dP ⊙ P)) with
    dP₁ = dD and dP₂ = −λ·dD for the gradient dD (b, H/2, rows, keys) of the differences; returns dλ = −Σ dD ⊙ P₂."""
    first, second = maps.chunk(2, dim=1)
    first_sums = torch.linalg.vecdot(grad_difference, first).unsqueeze(-1)
    second_sums = torch.linalg.vecdot(grad_difference, second).unsqueeze(-1)
    first.mul_(grad_difference - first_sums)
    second.mul_((grad_difference - second_sums).mul_(-lam))
    return -second_sums.sum().double()
