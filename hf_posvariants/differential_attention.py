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
model has folded it into the mask).

The kernels are transformers' attention interface, so eager, SDPA, flex and flash all work, with grouped KV
heads and every position encoding. Each pair's two maps meet its 2d-wide value in one kernel call (QKᵀ once)
where the kernel takes a value wider than the query, in one call with zero-padded queries and keys where it
needs equal widths, or in two calls, one per value half; `KERNEL_CALL_CHOICES` picks per backend and device,
and the paths agree to float rounding.

`output_attentions=True` returns, per layer, (B, num_attention_heads, Q, K): every softmax map, the first
maps of the H/2 differential heads followed by their second maps (whatever the head layout), i.e. the
kernel's own tensor. `DifferentialAttention.differential_map` turns it into the H/2 maps softmax₁ − λ·softmax₂.
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import functools
import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.cache_utils import Cache

from .attention import PosVarAttention, register_attention_variant, run_attention_kernel
from .position_encodings import Positions

HEAD_LAYOUTS = ("pairs", "halves")

# How the two maps of every pair reach the pair's 2d-wide value:
#   "one_call":    one kernel call with the two value halves side by side (2d wide): QKᵀ and softmax once;
#   "padded_call": the same call with queries and keys zero-padded to 2d, for kernels that need equal widths
#                  (flash): the matmul flops of two calls, but exp/softmax and the kernel's passes run once;
#   "two_calls":   one call per d-wide value half, each computing QKᵀ and both softmaxes again.
KERNEL_CALLS = ("one_call", "padded_call", "two_calls")

# (backend, device type) → the path that measured fastest there (each path forced through `kernel_calls`: CPU time
# of a training step at hidden 256, 4 layers, 8 heads / 4 KV heads, batch 4 × 256, one thread); absent pairs take
# "two_calls", which every kernel runs.
KERNEL_CALL_CHOICES: dict[tuple[str, str], str] = {
    # Eager materialises the maps anyway: one matmul and one softmax instead of two (CPU: one_call 0.90×
    # DiffLlama's time, padded_call 0.94×, two_calls 1.10×).
    ("eager", "cpu"): "one_call",
    ("eager", "cuda"): "one_call",
    # CPU flash needs equal widths (a 2d-wide value falls back to the math kernel): padded_call 0.98×
    # DiffLlama at 256 tokens and 0.94× at 512, two_calls 1.02× / 0.99×, one_call 1.05× / 1.20×. Both flash
    # paths do the same matmul flops; padded runs the exp and the kernel's passes once, which pays at d = 32
    # and evens out at d = 64 (4 heads: padded 1.00×, two_calls 0.98×, within the noise of a shared CPU).
    ("sdpa", "cpu"): "padded_call",
    # CUDA: a wider value leaves flash and cuDNN for the memory-efficient kernel (transformers measured two
    # calls ~30% faster than that, DiffLlamaAttention); padded_call keeps flash at 2d. Not measured here yet.
    ("sdpa", "cuda"): "two_calls",
}


def choose_kernel_calls(backend: str, device_type: str) -> str:
    """The kernel path (one of `KERNEL_CALLS`) of differential attention on `backend` and `device_type`."""
    return KERNEL_CALL_CHOICES.get((backend, device_type), "two_calls")


def depth_lambda_init(layer_idx: int) -> float:
    """The paper's λ_init = 0.8 − 0.6·exp(−0.3·(l − 1)) for the 1-based layer l = layer_idx + 1."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


@register_attention_variant("differential")
class DifferentialAttention(PosVarAttention):
    """Differential attention (Ye et al., "Differential Transformer", ICLR 2025): the difference of two softmax
    maps cancels attention noise shared by both; q/k/v/o projections are those of standard attention."""

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
        query, key, value = self.project(hidden_states, positions, cache)
        query, key = self.maps_first(query), self.maps_first(key)  # (B, H, Q, d), (B, H_kv, K, d)
        kwargs.update(self.bias_in_kernel_order(self.bias_arguments(positions.bias, query.dtype), query.device))
        if isinstance(attention_mask, torch.Tensor) and attention_mask.shape[1] > 1:  # a shared bias folded in
            attention_mask = self.maps_first(attention_mask)
        first, second, weights = self.attend_pairs(query, key, value, attention_mask, **kwargs)
        lam = self.differential_lambda().to(first.dtype)
        output = self.groupnorm(first - lam * second) * (1.0 - self.lambda_init)
        output = self.o_proj(output.reshape(*hidden_states.shape[:-1], -1))
        return output, weights  # weights: the kernel's own maps, so a gradient reaches them

    def attend_pairs(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Both maps of every pair applied to the pair's 2d-wide value, by the kernel path of
        `choose_kernel_calls(backend, device)` unless `self.kernel_calls` forces one.

        Takes maps-first queries/keys (B, H, Q, d), (B, H_kv, K, d) and the projected values (B, H_kv, K, d);
        returns the first- and second-map outputs, each (B, Q, H/2, 2d), and the maps (B, H, Q, K) or None.
        """
        path = self.kernel_calls or choose_kernel_calls(self.config._attn_implementation, query.device.type)
        if path not in KERNEL_CALLS:
            raise ValueError(f"kernel_calls={path!r} is not a differential kernel path; allowed: {list(KERNEL_CALLS)}.")
        # The value of KV pair m is its two value heads side by side, (B, H_kv/2, K, 2d); both maps of the
        # pair read it, so it is tiled over the first- and second-map KV heads.
        value_halves = self.split_pair(value)
        attend = functools.partial(run_attention_kernel, self, attention_mask=attention_mask, **kwargs)
        if path in ("one_call", "padded_call"):
            wide_value = torch.cat(value_halves, dim=-1)
            if path == "padded_call":  # zero columns add nothing to QKᵀ; `scaling` stays that of width d
                query, key = F.pad(query, (0, self.head_dim)), F.pad(key, (0, self.head_dim))
            output, weights = attend(query, key, torch.cat((wide_value, wide_value), dim=1))  # (B, Q, H, 2d)
            first, second = output.chunk(2, dim=2)
            return first, second, weights
        # One call per value half: each computes QKᵀ and both maps again, on equal widths.
        outputs = []
        for value_half in value_halves:
            output, weights = attend(query, key, torch.cat((value_half, value_half), dim=1))  # (B, Q, H, d)
            outputs.append(output)
        first, second = torch.cat(outputs, dim=-1).chunk(2, dim=2)
        return first, second, weights

    def bias_in_kernel_order(self, arguments: dict, device: torch.device) -> dict:
        """A bias tensor or score function seen from the kernel's [first maps, second maps] head order."""
        if "position_bias" in arguments:
            return {"position_bias": self.maps_first(arguments["position_bias"])}
        if "folded_bias" in arguments:  # per-distance rows of a bias already in the (reordered) mask
            bias = arguments["folded_bias"]
            return {"folded_bias": dataclasses.replace(bias, tables=(self.maps_first(bias.tables[0][None])[0],))}
        if "score_mod" not in arguments:
            return arguments
        score_mod = arguments["score_mod"]
        config_head = self.maps_first(torch.arange(self.num_heads, device=device)[None])[0]

        def reordered(score, batch, head, query, key):
            return score_mod(score, batch, config_head[head], query, key)

        return {"score_mod": reordered}
