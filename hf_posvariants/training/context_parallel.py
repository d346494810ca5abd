"""Context parallelism requested for a training run, checked before the data is prepared.

accelerate runs torch's context parallel (ring attention over `cp_size` ranks) when its `ParallelismConfig` has
`cp_size` > 1: `TrainingArguments(parallelism_config=...)`, or `accelerate launch --parallelism_config_cp_size N`,
which reaches every rank as environment variables. transformers' Trainer then splits `input_ids`, `labels`,
`shift_labels` and `position_ids` over the ranks (load-balanced: each rank holds a head and a tail piece), so the model
must read every position from `position_ids` and leave causality to SDPA's kernel.
"""

from __future__ import annotations

import os

from ..configuration_posvariants import PosVarConfig


def requested_cp_size(training_args) -> int:
    """The `cp_size` accelerate will use: the TrainingArguments' `parallelism_config`, else the one
    `accelerate launch --parallelism_config_*` put in the environment (read as accelerate 1.16 reads it), else 1."""
    parallelism_config = getattr(training_args, "parallelism_config", None)
    if parallelism_config is not None:
        return parallelism_config.cp_size or 1
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() == "true":
        return int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1"))
    return 1


def check_context_parallel_request(config: PosVarConfig, causal_lm: bool, attn_implementation: str,
                                   training_args) -> None:
    """Refuse a run that asks for context parallelism with a model that cannot split its sequence (see
    `PosVarConfig.check_context_parallel`); `causal_lm`: the run trains a causal language model."""
    cp_size = requested_cp_size(training_args)
    if cp_size > 1:
        config.check_context_parallel(cp_size, is_causal=causal_lm, attn_implementation=attn_implementation)
