"""The pipeline's Trainer: transformers' own, with a training order drawn in bounded memory."""

from __future__ import annotations

from torch.utils.data import Dataset, RandomSampler, Sampler
from transformers import Trainer

from .sampling import SeededShuffleSampler


class PosVarTrainer(Trainer):
    """transformers' Trainer, but for its shuffled training order.

    - The shuffled training order comes from `SeededShuffleSampler`, in place of the `RandomSampler` the
      Trainer builds, and only where accelerate would have made that its `SeedableRandomSampler`
      (`accelerator_config.use_seedable_sampler`, the default): the order, `data_seed` (else `seed`)
      included, is unchanged. Not being a `RandomSampler`, accelerate keeps it. Other sampling strategies
      are the Trainer's own."""

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is not RandomSampler or sampler.replacement or sampler._num_samples is not None:
            return sampler
        if not self.args.accelerator_config.use_seedable_sampler:
            return sampler
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SeededShuffleSampler(len(sampler.data_source), seed)
