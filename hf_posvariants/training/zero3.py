"""What the pipeline reads of a model that DeepSpeed ZeRO-3 keeps partitioned: each parameter holds an empty tensor
outside forward, its rank's part and full size (`ds_numel`) elsewhere.

The Trainer loads weights into such a model only through its DeepSpeed engine, which exists once `train()` has
started. A run resumed at its last step is not trained further (`pipeline.fit`): its final weights go in here, with
DeepSpeed's public `GatheredParameters`, one module's parameters at a time, so no rank holds the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME


def parameter_count(model: nn.Module) -> int:
    """The model's parameters, each counted once, whole also where ZeRO-3 partitioned them (`num_parameters()`
    would count their empty tensors: 0)."""
    return sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in model.parameters())


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Each tensor name of the folder's safetensors weights (one file, or shards with an index) → its file."""
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    path = folder / SAFE_WEIGHTS_NAME
    with safe_open(path, framework="pt") as weights:
        return dict.fromkeys(weights.keys(), path)


def load_into_partitioned(model: nn.Module, folder: str | Path) -> None:
    """`folder`'s weights into `model`'s ZeRO-3 partitions. Every rank calls this (gathering is collective); rank 0
    reads the tensors and DeepSpeed hands each rank its part when a module's parameters are partitioned again. A tied
    parameter is read under whichever of its names the folder holds."""
    import deepspeed

    files = weight_files(folder)
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    source = {}
    for key, candidates in names.items():
        found = [name for name in candidates if name in files]
        if not found:  # checked on every rank before any collective call, so no rank waits for a failed one
            raise ValueError(f"{folder} holds no weights for parameter {candidates[0]!r} (nor its tied names).")
        source[key] = found[0]
    reads = torch.distributed.get_rank() == 0
    for module in model.modules():
        parameters = list(module.parameters(recurse=False))
        if not parameters:
            continue
        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0), torch.no_grad():
            for parameter in parameters if reads else []:
                name = source[id(parameter)]
                with safe_open(files[name], framework="pt") as weights:
                    parameter.copy_(weights.get_tensor(name))
