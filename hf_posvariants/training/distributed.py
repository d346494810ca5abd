"""Scale-out from the recipe: a `distributed:` mapping of transformers' `DistributedConfig` fields.

transformers shards a model while loading it (`from_pretrained(..., distributed_config=...)`: FSDP2 over
`fsdp_size` ranks, replicated `dp_replicate_size` times across nodes (HSDP), tensor parallel over `tp_size`,
pipeline stages over `pp_size`), and its Trainer then trains the sharded model as it is, without wrapping it
again. A run from scratch has no checkpoint to load, so rank 0 writes the freshly initialised weights once
(`initial-weights/` in the output folder, deleted once loaded) and every rank loads them through that same path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel, Trainer
from transformers.distributed import DistributedConfig
from transformers.trainer import SCHEDULER_NAME

from .trainer import PosVarTrainer

INITIAL_WEIGHTS = "initial-weights"
# The fields a recipe may set: the sizes and switches of the mesh; the plans come from the model classes.
RECIPE_FIELDS = ("fsdp_size", "dp_replicate_size", "tp_size", "pp_size", "fsdp_cpu_offload", "fsdp_mixed_precision")


def distributed_config_from(value: str | dict | None) -> DistributedConfig | None:
    """The recipe's `distributed:` mapping (a dict, or its JSON from the command line) as a `DistributedConfig`;
    None when absent or empty. Unknown keys are refused with the allowed ones."""
    if value is None or value == "":
        return None
    fields = json.loads(value) if isinstance(value, str) else dict(value)
    if not isinstance(fields, dict):
        raise ValueError(f"distributed={value!r} must be a mapping of DistributedConfig fields {list(RECIPE_FIELDS)}.")
    unknown = sorted(set(fields) - set(RECIPE_FIELDS))
    if unknown:
        raise ValueError(f"distributed keys {unknown} are not supported; allowed keys are {list(RECIPE_FIELDS)}.")
    if not fields:
        return None
    return DistributedConfig(**fields)


def check_trainable_on(distributed_config: DistributedConfig | None, device_type: str) -> None:
    """Refuse, before any data is prepared, a tensor-parallel run the Trainer cannot start on `device_type`.

    transformers' Trainer hands a model sharded with `tp_size` > 1 to accelerate with a `ParallelismConfig`, and
    accelerate (1.16, `ParallelismConfig._validate_accelerator`) accepts one only for FSDP2, DeepSpeed or several
    GPUs (or other accelerators), not for CPU processes (`DistributedType.MULTI_CPU`): it would fail once the data
    and the sharded model are ready. Loading for inference (`from_pretrained(..., tp_plan="auto")`) works on CPU."""
    if distributed_config is not None and distributed_config.tp_size > 1 and device_type == "cpu":
        raise ValueError(
            f"distributed.tp_size={distributed_config.tp_size} cannot train on CPU: accelerate accepts a "
            "tensor-parallel model from the Trainer only on GPUs (or other accelerators), with FSDP2 or DeepSpeed, "
            "not in CPU processes (DistributedType.MULTI_CPU). Allowed on CPU is tp_size=1; shard with fsdp_size "
            "instead."
        )


def load_distributed(head, config, source: str | None, distributed_config: DistributedConfig, output_dir: str,
                     **load_kwargs):
    """`head` with its weights from `source` (a checkpoint), or freshly initialised from `config`, sharded by
    transformers as `distributed_config` says. Every rank calls this."""
    fresh = source is None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if fresh:
        source = str(Path(output_dir) / INITIAL_WEIGHTS)
        if rank == 0:
            head.from_config(config, attn_implementation=load_kwargs.get("attn_implementation")).save_pretrained(source)
        barrier()
    model = head.from_pretrained(source, config=config, distributed_config=distributed_config, **load_kwargs)
    keep_source_module(model)
    if fresh:
        barrier()  # every rank has its shard: the full copy goes (a resumed run loads its checkpoint instead)
        if rank == 0:
            shutil.rmtree(source)
    return model


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def keep_source_module(model) -> None:
    """FSDP2 swaps the model's class for a subclass it defines (`FSDPPosVar...`) in a torch module, and
    `save_pretrained` copies the source files of the class's module next to the weights (remote code): name the
    family's module, so checkpoints carry the family's files rather than torch's."""
    wrapped = type(model)
    if not issubclass(wrapped, FSDPModule):
        return
    family = next(
        cls for cls in wrapped.__mro__ if issubclass(cls, PreTrainedModel) and not issubclass(cls, FSDPModule)
    )
    wrapped.__module__ = family.__module__


SHARDED_STATE = "sharded_state"


class ShardedCheckpointTrainer(PosVarTrainer):
    """The pipeline's Trainer (`PosVarTrainer`) for a model sharded at load time, with checkpoints it can resume from.

    transformers refuses to checkpoint such a run's optimizer (its state is sharded like the weights). Here every
    checkpoint also holds `sharded_state/`: the model and optimizer state as each rank holds it, written with
    torch's distributed checkpoint (one file per rank); resuming loads it back into the same mesh. The gathered
    safetensors weights beside it stay what `from_pretrained` and the Hub read."""

    def __init__(self, *args, **kwargs):
        training_args = kwargs["args"]
        save_only_model, training_args.save_only_model = training_args.save_only_model, True
        try:
            super().__init__(*args, **kwargs)  # its refusal of optimizer checkpoints does not apply here
        finally:
            training_args.save_only_model = save_only_model

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        state = {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
        }
        dcp.save(state, checkpoint_id=os.path.join(output_dir, SHARDED_STATE))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        state = {"model": get_model_state_dict(self.model)}
        dcp.load(state, checkpoint_id=os.path.join(resume_from_checkpoint, SHARDED_STATE))
        set_model_state_dict(self.model, state["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.load(state, checkpoint_id=os.path.join(checkpoint, SHARDED_STATE))
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        scheduler = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), map_location="cpu", weights_only=True)
        self.lr_scheduler.load_state_dict(scheduler)


def trainer_class(model) -> type[Trainer]:
    """The Trainer for `model`: the sharded-checkpoint one when transformers sharded it at load time."""
    sharded = getattr(model, "is_distributed_loading_by_transformers", False)
    return ShardedCheckpointTrainer if sharded else PosVarTrainer
