"""liger-kernel's fused linear cross-entropy (Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM
Training", 2024) as `lm_loss="liger"`: Triton kernels on GPU that, like the "chunked" loss, never hold the
(tokens × vocab) logits. Registered in `LM_LOSSES` when the optional `liger-kernel` package is installed.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..lm_loss import LM_LOSSES, causal_lm_loss


def liger_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
              **kwargs) -> torch.Tensor:
    """Summed cross-entropy of hidden (N, D) under the LM head weight (V, D), by liger's fused kernel."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(weight, hidden, targets)


if importlib.util.find_spec("liger_kernel") is not None:
    LM_LOSSES["liger"] = functools.partial(causal_lm_loss, liger_sum)
