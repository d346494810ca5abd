"""The pipeline's Trainer: transformers' own, with a training order drawn in bounded memory and checkpoints
that never count as complete while they are being rewritten."""

from __future__ import annotations

import os

from torch.utils.data import Dataset, RandomSampler, Sampler
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .run_folder import read_run_record, unseal
from .sampling import SeededShuffleSampler


class PosVarTrainer(Trainer):
    """transformers' Trainer with two changes.

    - The shuffled training order comes from `SeededShuffleSampler`, in place of the `RandomSampler` the
      Trainer builds, and only where accelerate would have made that its `SeedableRandomSampler`
      (`accelerator_config.use_seedable_sampler`, the default): the order, `data_seed` (else `seed`)
      included, is unchanged. Not being a `RandomSampler`, accelerate keeps it. Other sampling strategies
      are the Trainer's own.
    - Saving into a checkpoint folder that is sealed already (a run resumed from an earlier checkpoint
      reaches a step it saved before) first removes the seal: the Trainer rewrites the files in place, and
      a crash halfway must leave a checkpoint that does not count as complete, not old files vouched for
      by a seal beside new ones."""

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is not RandomSampler or sampler.replacement or sampler._num_samples is not None:
            return sampler
        if not self.args.accelerator_config.use_seedable_sampler:
            return sampler
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SeededShuffleSampler(len(sampler.data_source), seed)

    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and read_run_record(folder) is not None:
            unseal(folder)
        super()._save_checkpoint(model, trial)
