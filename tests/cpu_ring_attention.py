"""torch's context-parallel ring attention on CPU tensors, for the tests.

torch 2.13's `context_parallel` turns SDPA's inputs into sequence-sharded DTensors and runs its ring algorithm
(`_templated_ring_attention`: the KV rotation, the head-tail load balancing, the log-sum-exp merge, and their backward)
only for the CUDA kernels (flash, memory-efficient, cuDNN); on CPU, SDPA's flash kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`) fails with "does not have a sharding strategy registered".
`install()` hands that kernel and its backward to the same ring functions, so a CPU run exercises everything of
torch's context parallel but the GPU kernel itself. It reaches into torch's private module: pinned to torch 2.13.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp

aten = torch.ops.aten
SEQUENCE_DIM = 2  # of SDPA's (B, H, T, D) heads
FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
FORWARD_ARGS = ("query", "key", "value", "dropout_p", "is_causal")
BACKWARD_ARGS = ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal")


def ring_cpu_flash(op_call, args: tuple, kwargs: dict) -> tuple[DTensor, ...]:
    """DTensor's handler of the CPU flash kernel (forward or backward) on sequence-sharded heads: torch's ring."""
    mesh = next(arg.device_mesh for arg in (*args, *kwargs.values()) if isinstance(arg, DTensor))
    names = FORWARD_ARGS if op_call is FORWARD else BACKWARD_ARGS
    bound = {**dict(zip(names, args)), **kwargs}
    bound = {name: value._local_tensor if isinstance(value, DTensor) else value for name, value in bound.items()}
    if bound.pop("attn_mask", None) is not None:
        raise NotImplementedError("context parallelism takes no attention mask")
    group = mesh.get_group()
    if op_call is FORWARD:
        local = torch_cp._templated_ring_attention(group, SEQUENCE_DIM, FORWARD.overloadpacket, **bound)
    else:
        local = torch_cp._templated_ring_attention_backward(
            group, SEQUENCE_DIM, BACKWARD.overloadpacket, grad_out_name="grad_out", **bound
        )
    return tuple(DTensor.from_local(tensor, mesh, [Shard(SEQUENCE_DIM)], run_check=False) for tensor in local)


def install() -> None:
    """Add the CPU flash kernel to the ops torch's context parallel intercepts (read when its context is entered)."""
    torch_cp.custom_ops[FORWARD] = ring_cpu_flash
    torch_cp.custom_ops[BACKWARD] = ring_cpu_flash
