"""Causal-LM cross-entropy straight from the hidden states, for training without the (tokens × vocab) logits.

The plain loss builds every logit, upcasts all of them to fp32 and keeps them for the backward: at batch
8 × 2048 and a 32k vocabulary that is 2 GiB per copy. Here the tokens go through the LM head a chunk at a
time; each chunk's fp32 logits give its loss and, at once, its gradients with respect to the hidden states
and the head's weight (softmax − one-hot), then are freed. The backward only scales the stored gradients.
So the matmuls are the plain loss's three (logits, ∂hidden, ∂weight) and at most one chunk of logits lives.

Same reduction as transformers' `ForCausalLMLoss`: labels shifted left by one (or `shift_labels` as given),
`ignore_index` skipped, the sum divided by `num_items_in_batch` when the Trainer passes it (gradient
accumulation) and by the number of counted tokens otherwise.

`LM_LOSSES` maps a name to such a function; `PosVarForCausalLM.use_lm_loss(name)` switches a model to it
for training steps. "chunked" is this file's; other implementations register themselves (liger-kernel's
fused linear cross-entropy: `hf_posvariants.training.fused_loss`).
This file imports only torch: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100
# Tokens per chunk: 1,024 × a 32k vocabulary is 128 MiB of fp32 logits.
CHUNK_TOKENS = 1024


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(hidden·weightᵀ, targets) over the counted targets, one chunk of rows at a time; the
    gradients are computed in the forward, chunk by chunk, so no logits are kept for the backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                ignore_index: int) -> torch.Tensor:
        # hidden (N, D), weight (V, D), targets (N,)
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[:2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk, chunk_targets = hidden[rows], targets[rows]
            logits = (chunk @ weight.T).float()  # (C, V): the only logits alive
            counted = chunk_targets != ignore_index
            picked = torch.where(counted, chunk_targets, 0)
            log_norm = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, picked[:, None]).squeeze(1)
            total += ((log_norm - target_logits) * counted).sum()
            if not (need_hidden_grad or need_weight_grad):
                continue
            grad_logits = torch.exp(logits.sub_(log_norm[:, None]))  # softmax, in the logits' memory
            grad_logits[torch.arange(len(picked), device=picked.device), picked] -= 1.0
            grad_logits *= counted[:, None]
            if need_hidden_grad:
                grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
            if need_weight_grad:
                grad_weight.addmm_(grad_logits.T, chunk.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def causal_lm_loss(
    summed_loss: Callable[..., torch.Tensor],
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The causal-LM loss of `hidden_states` (B, T, D) under the LM head `weight` (V, D), reduced as
    transformers' `ForCausalLMLoss` reduces it; `summed_loss(hidden (N, D), weight, targets (N,), ignore_index,
    **kwargs)` gives the summed cross-entropy of the counted targets."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # next-token targets
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    total = summed_loss(hidden_states.reshape(-1, hidden_states.shape[-1]), weight, targets, ignore_index, **kwargs)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    # The Trainer's count over the whole accumulated batch: micro-batch losses then add up to its mean.
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def chunked_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
    chunk_size: int = CHUNK_TOKENS, **kwargs,
) -> torch.Tensor:
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens.")
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)


chunked_causal_lm_loss = functools.partial(causal_lm_loss, chunked_sum)

LMLoss = Callable[..., torch.Tensor]
LM_LOSSES: dict[str, LMLoss] = {"chunked": chunked_causal_lm_loss}
