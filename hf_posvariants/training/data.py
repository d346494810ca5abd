"""Training text: the built-in position tasks, local files and folders, JSON lines, Hub datasets.

Every source ends as a `DatasetDict` with a "train" split (and "validation" when given) and one text
column; `pack_blocks` then tokenizes the texts, ends each with the end token and concatenates them into
fixed-length blocks with `datasets.map`, as transformers' run_clm does; `hold_out` makes the
validation split when none was given.
"""

from __future__ import annotations

import codecs
import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_dataset
from transformers import DataCollatorForLanguageModeling, TrainerCallback

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


TEXT_UNITS = ("document", "paragraph", "line")
TEXT_SUFFIXES = (".txt", ".text", ".md")
BUILDERS = {**{suffix: "text" for suffix in TEXT_SUFFIXES}, ".json": "json", ".jsonl": "json", ".csv": "csv"}


def _data_files(path: str, field_name: str) -> tuple[str, list[str]]:
    """The `datasets` builder name and the files of a file or folder; refuses what does not exist."""
    source = Path(path)
    if not source.exists():
        raise ValueError(f"{field_name}={path!r} does not exist.")
    files = sorted(str(p) for p in source.rglob("*") if p.is_file()) if source.is_dir() else [str(source)]
    if not files:
        raise ValueError(f"{field_name}={path!r} is a folder with no files.")
    if all(Path(f).stat().st_size == 0 for f in files):
        raise ValueError(f"{field_name}={path!r} is empty: {len(files)} file(s), none with any content.")
    suffixes = {Path(f).suffix for f in files}
    unknown = suffixes - set(BUILDERS)
    kinds = {BUILDERS[s] for s in suffixes if s in BUILDERS}
    if unknown or len(kinds) != 1:
        raise ValueError(
            f"{field_name}={path!r}: files have extensions {sorted(suffixes)}; use one kind, with allowed "
            f"extensions {sorted(BUILDERS)}."
        )
    for file in files:
        check_utf8(file, field_name)
    return kinds.pop(), files


def check_utf8(path: str, field_name: str, chunk_size: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 text (a NUL byte or an invalid sequence), naming the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            position = chunk.find(b"\0")
            try:
                if position >= 0:
                    raise UnicodeDecodeError("utf-8", chunk, position, position + 1, "NUL byte")
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{field_name}: {path!r} is not UTF-8 text (byte 0x{chunk[error.start]:02x} at offset "
                    f"{offset + error.start}: {error.reason}); training files must be UTF-8 text, JSON lines or CSV."
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{field_name}: {path!r} is not UTF-8 text (it ends inside a multi-byte character).") from None


def load_splits(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_file: str | None,
    validation_file: str | None,
    validation_fraction: float,
    seed: int,
    builtin_examples: int,
    text_unit: str = "document",
) -> DatasetDict:
    """Splits from the first source given: local files, a Hub dataset, or the built-in tasks.

    A text file is read as documents that keep their newlines: the whole file, or with
    `text_unit="paragraph"`/"line" each blank-line-separated paragraph or each line. There may be no
    "validation" split yet: `hold_out` makes one after tokenization, so a single document can be split.
    """
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit={text_unit!r} is not supported; allowed values are {list(TEXT_UNITS)}.")
    if train_file is not None:
        builder, files = _data_files(train_file, "train_file")
        data_files = {"train": files}
        if validation_file is not None:
            validation_builder, data_files["validation"] = _data_files(validation_file, "validation_file")
            if validation_builder != builder:
                raise ValueError(f"validation_file {validation_file!r} is {validation_builder}, train_file is {builder}.")
        options = {"sample_by": text_unit, "keep_linebreaks": True} if builder == "text" else {}
        splits = load_dataset(builder, data_files=data_files, **options)
    elif dataset_name in (None, BUILTIN):
        return _builtin_splits(builtin_examples, seed, validation_fraction)
    else:
        splits = load_dataset(dataset_name, dataset_config_name)
    if len(splits["train"]) == 0:
        raise ValueError(f"the training data ({train_file or dataset_name!r}) is empty.")
    return splits


def drop_blank_texts(splits: DatasetDict, text_column: str, source: str) -> DatasetDict:
    """Remove texts with nothing but whitespace; refuse data left with no text at all."""
    kept = splits.filter(lambda batch: [bool(text and text.strip()) for text in batch[text_column]], batched=True)
    for split, dataset in kept.items():
        if len(dataset) == 0:
            raise ValueError(f"the {split} data ({source}) has no text: its {len(splits[split])} "
                             f"{'entries are' if len(splits[split]) != 1 else 'entry is'} blank.")
    return kept


def hold_out(splits: DatasetDict, fraction: float, seed: int, unit: str, shuffle: bool) -> DatasetDict:
    """Splits with a "validation" split: the given one, or `fraction` of the training rows held out
    (the last rows when not shuffled, so held-out text is contiguous and unseen)."""
    if "validation" in splits:
        return splits
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction={fraction} must lie strictly between 0 and 1 (or give validation_file).")
    total = len(splits["train"])
    held = int(total * fraction)
    if held < 1 or held >= total:
        needed = math.ceil(1 / fraction)
        raise ValueError(
            f"too little data for a validation split: validation_fraction={fraction} of {total} {unit} is less "
            f"than one; at least {needed} are needed. Add data, lower validation_fraction or block_size, or give "
            "validation_file."
        )
    parts = splits["train"].train_test_split(test_size=held, shuffle=shuffle, seed=seed)
    return DatasetDict(train=parts["train"], validation=parts["test"])


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
            tokens = sum(len(ids) for ids in tokenized[split]["input_ids"]) if len(tokenized[split]) else 0
            raise ValueError(
                f"the {split} split yields no block of block_size={block_size} tokens ({tokens} tokens in all); "
                "use a smaller block_size or more data."
            )
    return packed


@dataclass
class SeededMasking(DataCollatorForLanguageModeling, TrainerCallback):
    """Masked-LM batches whose masks are drawn from (seed, epoch, the batch's tokens) alone.

    transformers' collator draws masks from the global RNG, which the Trainer restores on resume only
    after it has collated the first resumed batch, so a resumed run masks differently from an
    uninterrupted one. Here the masking RNG never touches the global one, and the same batch in the
    same epoch gets the same masks, in a resumed run, a fresh one or a DataLoader worker. As a
    callback it learns the epoch, so masks still change from epoch to epoch (dynamic masking).
    """

    mask_seed: int = 0
    epoch: int = 0

    def torch_mask_tokens(self, inputs: torch.Tensor, special_tokens_mask=None, offset_mapping=None):
        key = f"{self.mask_seed}:{self.epoch}".encode()
        digest = hashlib.blake2b(inputs.contiguous().numpy().tobytes(), digest_size=8, key=key).digest()
        self.generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return super().torch_mask_tokens(inputs, special_tokens_mask=special_tokens_mask, offset_mapping=offset_mapping)

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is the completed fraction, also when resumed mid-epoch from a checkpoint.
        self.epoch = math.floor(state.epoch or 0)
