"""How an additive position bias reaches the attention kernel: one table of what each backend can carry, and one
decision per forward, `choose_bias_route`, that the model stores on `Positions` and every layer and kernel obeys.

A bias travels in one of three ways: inside the additive float mask (eager and SDPA add it to the scores, together
with a layer's own `position_bias` tensor), as flex attention's score function, or not at all (flash kernels have
nowhere to put one, nor has `paged|eager` outside a continuous batch; validation refuses a bias there). A bias that
is, for every key a query sees, a per-head factor times a per-key value plus a constant of the query row (ALiBi under
a causal mask: −m·(i − j) = m·j − m·i) may instead ride in one extra column of the queries and keys, where softmax
ignores the row's constant: the kernel then keeps its causal block skipping and reads no (Q, K) tensor. Adding a
backend is one row below: the backend groups, and the lists that differential attention and the evaluation read,
follow from it.
This file imports only the standard library: it travels with remote-code checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .position_encodings import ScoreBias

BiasCarrier = Literal["mask", "score_function", "none"]
# Where the gradient of a learned bias folded into the mask goes: through the kernel's own backward ("autograd"), or
# through `FlashAttentionWithBiasGradient` (CPU) to the mask ("mask") or straight to the per-distance row ("row").
BiasGradient = Literal["autograd", "mask", "row"]


@dataclass(frozen=True)
class BackendBias:
    """How one attention backend carries a bias: `carrier`; whether a learned bias in its mask may train through
    `FlashAttentionWithBiasGradient` on CPU (which keeps no (Q, K) tensor per layer for the backward); whether,
    handed no mask, its kernel applies causality itself (SDPA's `is_causal`), which a stand-in for it must too;
    whether on CPU a bias linear in the key may ride in an extra query/key column (`BiasRoute.columns`); whether its
    kernel computes the (B, H, Q, K) maps in the open and returns them (transformers runs `output_attentions` on such
    a backend alone); and who writes continuous batching's paged KV cache with it: the layer ("layer"), the kernel
    itself ("kernel"), or nobody, as continuous batching does not run it (None)."""

    carrier: BiasCarrier
    cpu_gradient_kernel: bool = False
    causal_without_mask: bool = False
    cpu_bias_columns: bool = False
    returns_maps: bool = False
    paged_cache: Literal["layer", "kernel"] | None = None


# transformers' own kernels, every one of which leaves generate()'s KV cache to the layer. `paged|eager` is the eager
# kernel of continuous batching: outside a continuous batch no mask is built for it, so it carries no bias.
BACKEND_BIAS: dict[str, BackendBias] = {
    # Eager stays the reference: it materialises the scores anyway, so a column would save it nothing.
    "eager": BackendBias("mask", returns_maps=True),
    "sdpa": BackendBias("mask", cpu_gradient_kernel=True, causal_without_mask=True, cpu_bias_columns=True,
                        paged_cache="layer"),
    "flex_attention": BackendBias("score_function"),
    "flash_attention_2": BackendBias("none", paged_cache="kernel"),
    "flash_attention_3": BackendBias("none", paged_cache="kernel"),
    "flash_attention_4": BackendBias("none", paged_cache="kernel"),
    "paged|eager": BackendBias("none", paged_cache="layer"),
}


def backends_carrying(*carriers: BiasCarrier) -> tuple[str, ...]:
    """The backends of `BACKEND_BIAS` whose carrier is one of `carriers`, in table order."""
    return tuple(name for name, backend in BACKEND_BIAS.items() if backend.carrier in carriers)


MASK_BIAS_BACKENDS = backends_carrying("mask")
SCORE_BIAS_BACKENDS = backends_carrying("mask", "score_function")
SCORE_FUNCTION_BACKENDS = backends_carrying("score_function")
BIASLESS_BACKENDS = backends_carrying("none")
MAP_BACKENDS = tuple(name for name, backend in BACKEND_BIAS.items() if backend.returns_maps)
# The mask carriers by kernel: the maps computed in the open (eager), or fused (SDPA: never in memory as a whole).
OPEN_MASK_BACKENDS = tuple(name for name in MASK_BIAS_BACKENDS if name in MAP_BACKENDS)
FUSED_MASK_BACKENDS = tuple(name for name in MASK_BIAS_BACKENDS if name not in MAP_BACKENDS)
PAGED_CACHE_LAYER_BACKENDS = tuple(name for name, backend in BACKEND_BIAS.items() if backend.paged_cache == "layer")


@dataclass(frozen=True)
class BiasRoute:
    """How position bias reaches every kernel call of one forward, for one encoding's layers.

    ``carrier``: how the backend takes any bias, the shared one or a layer's own (DeBERTa's position terms, CoPE's
    counts): a tensor added to the scores ("mask") or a score function. ``folded``: the shared bias is inside the
    mask, folded in once per forward. ``gradient``: where a folded learned bias sends its gradient. ``causal``: the
    folded mask holds causality alone besides the bias (no padding, as many queries as keys), so the gradient kernel
    may skip the keys after each query. ``columns``: the shared bias rides in one extra query and key column
    (`ScoreBias.columns`) and nothing is folded: the mask stays transformers' own. ``own_kernel``: the layers add their
    own bias (DeBERTa's position terms) in a fused CPU kernel of theirs instead of calling the backend, which would take
    its math kernel for a bias needing a gradient; that kernel adds the mask as the backend would.
    """

    carrier: BiasCarrier
    folded: bool = False
    gradient: BiasGradient = "autograd"
    causal: bool = False
    columns: bool = False
    own_kernel: bool = False

    @property
    def gradient_kernel(self) -> bool:
        """Whether every kernel call takes `FlashAttentionWithBiasGradient` instead of the backend's own."""
        return self.gradient != "autograd"


def choose_bias_route(
    backend: str,
    device_type: str,
    bias: ScoreBias | None,
    *,
    grad_enabled: bool,
    attention_dropout: bool,
    compiling: bool,
    layers_take_gradient_kernel: bool,
    layers_take_columns: bool,
    single_precision: bool,
    causal_only: bool,
    training: bool = False,
    layers_own_kernel: bool = False,
) -> BiasRoute:
    """The route of a forward on `backend` and `device_type` with the shared `bias` (None: none).

    A fixed bias linear in the key (`bias.linear_in_key`) rides in an extra query/key column on a CPU backend that
    allows it, where the kernel computes in float32 or wider (`single_precision`: in bf16 key slots beyond 256 round,
    and the scores with them) and every layer of the encoding calls the kernel plainly (`layers_take_columns`).
    Else a shared bias rides in the mask where the backend adds masks, else it becomes a score function. A learned one
    in the mask on a CPU backend with the gradient kernel trains through it, sending the gradient straight to the
    per-distance row where the bias is one: unless the grad mode is off, attention dropout is on (the kernel has
    none), the forward is being compiled, or a layer cannot take that kernel (`layers_take_gradient_kernel`: it adds
    a bias of its own, or computes the maps itself). That kernel skips the keys after each query where the forward's
    mask is causality alone (`causal_only`: causal, unpadded, as many queries as keys).

    Layers adding their own bias with a fused CPU kernel of theirs (`layers_own_kernel`) run it on a CPU backend with
    the gradient kernel, in float32 or wider, uncompiled, with gradients or in `training` mode (reentrant
    checkpointing runs a training step first without them, and both runs must draw the same attention dropout),
    unless the mask itself needs a gradient (a learned shared bias folded in), which that kernel does not return.
    """
    row = BACKEND_BIAS.get(backend, BackendBias("none"))
    cpu = device_type == "cpu"
    learned = bias is not None and grad_enabled and bias.requires_grad
    kernel_allowed = layers_take_gradient_kernel and not (attention_dropout or compiling)
    route = shared_bias_route(row, bias, cpu, learned, kernel_allowed, single_precision and layers_take_columns,
                              causal_only)
    learned_mask = learned and route.folded and not route.gradient_kernel
    own_kernel = layers_own_kernel and row.cpu_gradient_kernel and cpu and single_precision and not compiling
    return replace(route, own_kernel=True) if own_kernel and (grad_enabled or training) and not learned_mask else route


def shared_bias_route(
    row: BackendBias, bias: ScoreBias | None, cpu: bool, learned: bool, kernel_allowed: bool, columns_allowed: bool,
    causal_only: bool,
) -> BiasRoute:
    """`choose_bias_route` for the shared `bias` on the backend of `row`: in columns where they are allowed, folded
    into the mask, or through the gradient kernel where a `learned` bias may take it."""
    if bias is None or row.carrier != "mask":
        return BiasRoute(row.carrier)
    fixed_linear = bias.linear_in_key and not bias.requires_grad
    if fixed_linear and row.cpu_bias_columns and cpu and columns_allowed:
        return BiasRoute(row.carrier, columns=True)
    if not (learned and row.cpu_gradient_kernel and cpu and kernel_allowed):
        return BiasRoute(row.carrier, folded=True)
    gradient = "row" if bias.row is not None else "mask"
    return BiasRoute(row.carrier, folded=True, gradient=gradient, causal=causal_only)
