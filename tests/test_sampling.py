"""The training order: the Trainer's seeded shuffle, drawn without a Python int per block."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from accelerate import skip_first_batches
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from hf_posvariants.configuration_posvariants import PosVarLlamaConfig
from hf_posvariants.modeling_posvariants import PosVarLlamaForCausalLM
from hf_posvariants.training.distributed import trainer_class
from hf_posvariants.training.sampling import SeededShuffleSampler


class Blocks(Dataset):
    """`length` one-token blocks whose token is the block's index, so a batch shows the order."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": torch.tensor([index])}


def trainer(cls, length: int, tmp_path, **args) -> Trainer:
    config = PosVarLlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)  # fmt: skip
    training_args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True,
                                      **args)  # fmt: skip
    return cls(model=PosVarLlamaForCausalLM(config), args=training_args, train_dataset=Blocks(length))


def epoch_order(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return torch.cat([batch["input_ids"].flatten() for batch in loader]).tolist()


@pytest.mark.parametrize("args", [{"seed": 3}, {"seed": 3, "data_seed": 11}])
def test_the_order_is_the_trainers_own_in_every_epoch_and_after_a_resume_skip(tmp_path, args):
    """Runs and checkpoints of the plain Trainer keep their data order: a resumed one skips the same batches."""
    ours, plain = trainer(trainer_class(None), 103, tmp_path, **args), trainer(Trainer, 103, tmp_path, **args)
    ours_loader, plain_loader = ours.get_train_dataloader(), plain.get_train_dataloader()
    assert isinstance(ours_loader.batch_sampler.sampler, SeededShuffleSampler)  # accelerate kept it
    for epoch in (0, 1, 2):
        order = epoch_order(ours_loader, epoch)
        assert sorted(order) == list(range(103))
        assert order == epoch_order(plain_loader, epoch), epoch
    assert epoch_order(skip_first_batches(ours_loader, 5), 1) == epoch_order(plain_loader, 1)[20:]
    assert epoch_order(ours_loader, 0) != epoch_order(ours_loader, 1)


def test_a_seedable_sampler_turned_off_leaves_the_trainers_sampler(tmp_path):
    ours = trainer(trainer_class(None), 10, tmp_path, accelerator_config={"use_seedable_sampler": False})
    assert not isinstance(ours._get_train_sampler(), SeededShuffleSampler)


def test_the_first_batch_of_a_million_blocks_holds_no_python_int_per_block(tmp_path):
    """The shuffled order of a 1 GiB text's 6.45 M blocks held 280 MiB as a list of Python ints all epoch."""
    loader = trainer(trainer_class(None), 1_000_000, tmp_path).get_train_dataloader()
    tracemalloc.start()
    try:
        next(iter(loader))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB of Python objects for the first batch"


def test_the_sampler_draws_every_block_once_past_a_chunk_and_advances_its_epoch():
    sampler = SeededShuffleSampler(200_003, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(200_003)) and sampler.epoch == 1
    assert list(sampler) != first and sampler.epoch == 2
    sampler.set_epoch(0)
    assert list(sampler) == first
