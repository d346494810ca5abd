"""Training text: the built-in position tasks, local files and folders, JSON lines, Hub datasets.

Every source ends as a `DatasetDict` with a "train" and a "validation" split and one text column;
`pack_blocks` then tokenizes and concatenates the texts into fixed-length blocks with `datasets.map`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

BUILTIN = "builtin"
IGNORE_INDEX = -100  # label of positions that take no part in the loss (PyTorch's and transformers' convention)
SYMBOLS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def _copy(rng: random.Random) -> str:
    seq = rng.choices(SYMBOLS, k=rng.randint(3, 10))
    return f"copy : {' '.join(seq)} = {' '.join(seq)}"


def _reverse(rng: random.Random) -> str:
    seq = rng.choices(SYMBOLS, k=rng.randint(3, 10))
    return f"reverse : {' '.join(seq)} = {' '.join(reversed(seq))}"


def _recall(rng: random.Random) -> str:
    keys = rng.sample(SYMBOLS, k=rng.randint(2, 6))
    pairs = [(key, str(rng.randint(0, 9))) for key in keys]
    key, value = rng.choice(pairs)
    return f"recall : {' '.join(f'{k} {v}' for k, v in pairs)} ? {key} = {value}"


def _count(rng: random.Random) -> str:
    target = rng.choice(SYMBOLS[:4])
    seq = rng.choices(SYMBOLS[:4], k=rng.randint(3, 12))
    return f"count {target} : {' '.join(seq)} = {seq.count(target)}"


# Each task is answerable only by looking at *where* tokens are (same slot, mirrored slot, the slot
# after a key) or by attending over the whole sequence, so the position encoding matters.
BUILTIN_TASKS: dict[str, Callable[[random.Random], str]] = {
    "copy": _copy,
    "reverse": _reverse,
    "recall": _recall,
    "count": _count,
}


def builtin_texts(num_examples: int, seed: int) -> list[str]:
    """A deterministic list of task lines: the same (num_examples, seed) always gives the same corpus."""
    rng = random.Random(seed)
    tasks = list(BUILTIN_TASKS.values())
    return [tasks[i % len(tasks)](rng) for i in range(num_examples)]


def _builtin_splits(num_examples: int, seed: int, validation_fraction: float) -> DatasetDict:
    num_validation = max(1, int(num_examples * validation_fraction))
    return DatasetDict(
        train=Dataset.from_dict({"text": builtin_texts(num_examples, seed)}),
        # A different seed, so validation lines are new draws rather than copies of training lines.
        validation=Dataset.from_dict({"text": builtin_texts(num_validation, seed + 1)}),
    )


def _data_files(path: str) -> tuple[str, list[str]]:
    """The `datasets` builder name and the files of a file or folder; refuses what does not exist."""
    source = Path(path)
    if not source.exists():
        raise ValueError(f"data file {path!r} does not exist.")
    files = sorted(str(p) for p in source.rglob("*") if p.is_file()) if source.is_dir() else [str(source)]
    if not files:
        raise ValueError(f"data folder {path!r} contains no files.")
    if all(Path(f).stat().st_size == 0 for f in files):
        raise ValueError(f"data {path!r} is empty: {len(files)} file(s), none with any content.")
    suffixes = {Path(f).suffix for f in files}
    builders = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
    unknown = suffixes - set(builders)
    kinds = {builders[s] for s in suffixes if s in builders}
    if unknown or len(kinds) != 1:
        raise ValueError(
            f"data files under {path!r} have extensions {sorted(suffixes)}; use one kind, with allowed "
            f"extensions {sorted(builders)}."
        )
    return kinds.pop(), files


def load_splits(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_file: str | None,
    validation_file: str | None,
    validation_fraction: float,
    seed: int,
    builtin_examples: int,
) -> DatasetDict:
    """Train/validation splits from the first source given: local files, a Hub dataset, or the built-in tasks."""
    if train_file is not None:
        builder, files = _data_files(train_file)
        data_files = {"train": files}
        if validation_file is not None:
            validation_builder, data_files["validation"] = _data_files(validation_file)
            if validation_builder != builder:
                raise ValueError(f"validation_file {validation_file!r} is {validation_builder}, train_file is {builder}.")
        splits = load_dataset(builder, data_files=data_files)
    elif dataset_name in (None, BUILTIN):
        return _builtin_splits(builtin_examples, seed, validation_fraction)
    else:
        splits = load_dataset(dataset_name, dataset_config_name)
    if len(splits["train"]) == 0:
        raise ValueError(f"the training data ({train_file or dataset_name!r}) is empty.")
    if "validation" not in splits:
        held_out = splits["train"].train_test_split(test_size=validation_fraction, seed=seed)
        splits = DatasetDict(train=held_out["train"], validation=held_out["test"])
    return splits


def text_column_of(dataset: Dataset, text_column: str | None) -> str:
    """The named text column, or the only/first string column; a clear error when there is none."""
    columns = dataset.column_names
    if text_column is not None:
        if text_column not in columns:
            raise ValueError(f"text_column={text_column!r} is not a column of the data; allowed values are {columns}.")
        return text_column
    if "text" in columns:
        return "text"
    string_columns = [c for c in columns if dataset.features[c].dtype == "string"]
    if not string_columns:
        raise ValueError(f"the data has no text column (columns: {columns}); set text_column.")
    return string_columns[0]


def pack_blocks(splits: DatasetDict, tokenizer, text_column: str, block_size: int, num_proc: int | None = None):
    """Tokenize every text, join them with the tokenizer's separator, and cut the stream into blocks.

    The tail shorter than `block_size` is dropped, as in transformers' run_clm/run_mlm examples.
    """
    separator = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id]
    if separator[0] is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither an eos_token nor a sep_token to separate texts.")

    def tokenize(batch):
        encoded = tokenizer(batch[text_column], add_special_tokens=False)
        return {"input_ids": [ids + separator for ids in encoded["input_ids"] if ids]}

    def group(batch):
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) // block_size * block_size
        blocks = [stream[start : start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks]}

    tokenized = splits.map(tokenize, batched=True, remove_columns=splits["train"].column_names, num_proc=num_proc)
    # One map call per 1000 texts: blocks never straddle map batches, which costs at most one block per batch.
    packed = tokenized.map(group, batched=True, num_proc=num_proc)
    for split, dataset in packed.items():
        if len(dataset) == 0:
            raise ValueError(
                f"the {split} split yields no block of block_size={block_size} tokens "
                f"({sum(len(ids) for ids in tokenized[split]['input_ids'])} tokens in all); use a smaller "
                "block_size or more data."
            )
    return packed
