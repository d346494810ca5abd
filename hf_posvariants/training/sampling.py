"""The training order: accelerate's seeded shuffle, drawn in memory that stays small on big corpora.

The Trainer shuffles with a `RandomSampler`, which accelerate replaces by its `SeedableRandomSampler` (the same
order on every rank, reseeded each epoch). Both turn the epoch's permutation into a list of Python ints: about
36 bytes a block, 280 MiB of memory that cannot be dropped for the 6.45 M blocks of a 1 GiB text, held all epoch.
`SeededShuffleSampler` draws the very same permutation and keeps it as one tensor (4 bytes a block), handing
out its indices a chunk at a time, so runs, resumes and checkpoints of either keep their data order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

# Indices turned into Python ints at a time: 64 Ki of them are about 2 MiB.
CHUNK = 1 << 16


class SeededShuffleSampler(Sampler[int]):
    """Each epoch, a permutation of `range(length)` drawn from a CPU generator seeded with `seed + epoch`:
    the order accelerate's `SeedableRandomSampler` yields for the same seed and epoch. Like it, the epoch
    advances by one after each full pass, and `set_epoch` sets it (the Trainer does at every epoch)."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        # int32 draws the same permutation as int64 (the shuffle's random numbers do not depend on the dtype).
        dtype = torch.int32 if self.length < 2**31 else torch.int64
        order = torch.randperm(self.length, generator=generator, dtype=dtype)
        for start in range(0, self.length, CHUNK):
            yield from order[start : start + CHUNK].tolist()
        self.set_epoch(self.epoch + 1)
