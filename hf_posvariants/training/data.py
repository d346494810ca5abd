"""Training text: the built-in position tasks, local files and folders, JSON lines, Hub datasets.

Every source ends as a `DatasetDict` with a "train" split (and "validation" when given) and one text
column; `pack_blocks` then tokenizes the texts, ends each with the end token and concatenates them into
fixed-length blocks, as transformers' run_clm does; `hold_out` makes the validation split when none
was given.

Memory stays bounded whatever the size of the data: text files are read in pieces of about
`PIECE_CHARS` characters, cut only after a newline between two non-space characters (a row flagged
`TEXT_ENDS` closes its text), tokenized a few pieces at a time, and blocks are written to disk as they
fill. A cut is kept only where the tokenizer gives the same tokens with and without it; elsewhere the
pieces are joined again, so the blocks are those of the whole text.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value, load_dataset
from datasets.fingerprint import Hasher
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


def check_utf8(path: str, field_name: str) -> str:
    """Refuse a file that is not UTF-8 text (a NUL byte or an invalid sequence), naming the byte offset;
    returns the SHA-256 of its bytes (read once, whatever the caller asks for later)."""
    status = Path(path).stat()
    problem, digest = _scan(str(Path(path).resolve()), status.st_size, status.st_mtime_ns)
    if problem:
        raise ValueError(f"{field_name}: {path!r} is not UTF-8 text ({problem}); training files must be UTF-8 "
                         "text, JSON lines or CSV.")  # fmt: skip
    return digest


@functools.lru_cache(maxsize=256)
def _scan(path: str, size: int, mtime_ns: int, chunk_size: int = 1 << 20) -> tuple[str | None, str]:
    """(what is wrong with the file as UTF-8 text or None, SHA-256 of its bytes); keyed by size and mtime,
    so a file changed since is read again."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    digest = hashlib.sha256()
    offset = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
            position = chunk.find(b"\0")
            try:
                if position >= 0:
                    raise UnicodeDecodeError("utf-8", chunk, position, position + 1, "NUL byte")
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                return f"byte 0x{chunk[error.start]:02x} at offset {offset + error.start}: {error.reason}", ""
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "it ends inside a multi-byte character", ""
    return None, digest.hexdigest()


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's files (their relative names and bytes, in name order)."""
    source = Path(path)
    if source.is_file():
        return check_utf8(str(source), "data")
    digest = hashlib.sha256()
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(source).as_posix()}\0{check_utf8(str(file), 'data')}\n".encode())
    return digest.hexdigest()


PIECE_CHARS = 1 << 16
# Rows read at once: 4 MiB of text-file pieces. A batch of 1000 (datasets' default) held 256 MiB.
ROWS_AT_ONCE = 64
TEXT_ENDS = "text_ends"  # column of text-file rows: False where the next row continues the same text
TEXT_FEATURES = Features({"text": Value("string"), TEXT_ENDS: Value("bool")})


def _last_cut(text: str) -> int:
    """The last position just after a newline where a cut leaves the words of byte-level BPE (GPT-2's
    pattern) and BERT's pre-tokenizer as they were, or 0: either the newline stands alone between two
    non-space characters, or one whitespace character follows it before the next word."""
    newline = text.rfind("\n", 0, len(text) - 2)
    while newline >= 0:
        after = text[newline + 1]
        if (not text[newline + 2].isspace()) if after.isspace() else (newline > 0 and not text[newline - 1].isspace()):
            return newline + 1
        newline = text.rfind("\n", 0, newline)
    return 0


def text_pieces(path: str, text_unit: str, piece_chars: int = PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """(piece, ends its text) of a UTF-8 file read `piece_chars` at a time: the texts `datasets`' text
    builder makes of it (a document keeps its newlines, paragraphs are split at blank lines, lines keep
    their newline), with long texts cut after newlines."""
    with open(path, encoding="utf-8") as handle:  # universal newlines, as the datasets builder reads
        if text_unit == "line":
            yield from ((line, True) for line in handle)
            return
        buffer = ""
        while chunk := handle.read(piece_chars):
            buffer += chunk
            if text_unit == "paragraph":
                *paragraphs, buffer = buffer.split("\n\n")
                yield from ((paragraph, True) for paragraph in paragraphs if paragraph)
            if len(buffer) >= piece_chars and (cut := _last_cut(buffer)):
                yield buffer[:cut], False
                buffer = buffer[cut:]
        if buffer or text_unit == "document":
            yield buffer, True


def _text_rows(files: list[str], text_unit: str) -> Iterator[dict]:
    for file in files:
        for text, ends in text_pieces(file, text_unit, PIECE_CHARS):
            yield {"text": text, TEXT_ENDS: ends}


def read_text_files(files: list[str], text_unit: str) -> Dataset:
    """The files' texts as a dataset on disk, written a few pieces at a time."""
    digests = [check_utf8(file, "data") for file in files]
    fingerprint = Hasher.hash(["text_pieces", 2, text_unit, PIECE_CHARS, digests])
    return Dataset.from_generator(_text_rows, features=TEXT_FEATURES, gen_kwargs={"files": files, "text_unit": text_unit},
                                  fingerprint=fingerprint, writer_batch_size=16)  # fmt: skip


class TextColumn:
    """The texts of one column, read from the dataset in batches; iterable any number of times."""

    def __init__(self, dataset: Dataset, column: str, batch_size: int = ROWS_AT_ONCE):
        self.dataset, self.column, self.batch_size = dataset, column, batch_size

    def __iter__(self) -> Iterator[str]:
        for batch in self.dataset.select_columns([self.column]).iter(batch_size=self.batch_size):
            yield from batch[self.column]


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
        if builder == "text":
            splits = DatasetDict({split: read_text_files(files, text_unit) for split, files in data_files.items()})
        else:
            splits = load_dataset(builder, data_files=data_files)
    elif dataset_name in (None, BUILTIN):
        return _builtin_splits(builtin_examples, seed, validation_fraction)
    else:
        splits = load_dataset(dataset_name, dataset_config_name)
    if len(splits["train"]) == 0:
        raise ValueError(f"the training data ({train_file or dataset_name!r}) is empty.")
    return splits


def drop_unusable_texts(splits: DatasetDict, text_column: str, source: str,
                        max_dropped_fraction: float) -> tuple[DatasetDict, list[str]]:  # fmt: skip
    """Remove rows with no text in `text_column` (missing, null, or whitespace only); returns the kept
    splits and a line per split that lost rows, saying how many and why.

    Refuses data left with no text, and data that lost more than `max_dropped_fraction` of its rows;
    blank lines and blank files of a text file are separators, reported but not counted against it.
    """
    if not 0 <= max_dropped_fraction <= 1:
        raise ValueError(f"max_dropped_fraction={max_dropped_fraction} must lie between 0 and 1.")
    notes = []
    kept = DatasetDict()
    for split, dataset in splits.items():
        missing, blank = _unusable_counts(dataset, text_column)
        kept[split] = dataset.filter(lambda texts: [bool(text and text.strip()) for text in texts], batched=True,
                                     batch_size=ROWS_AT_ONCE, input_columns=[text_column])  # fmt: skip
        total = len(dataset)
        if len(kept[split]) == 0:
            raise ValueError(f"the {split} data ({source}) has no text: its {total} "
                             f"{'entries are' if total != 1 else 'entry is'} blank or lack {text_column!r}.")  # fmt: skip
        if not missing and not blank:
            continue
        counted = missing + (0 if TEXT_ENDS in dataset.column_names else blank)
        why = f"{missing} with no {text_column!r} value (missing or null), {blank} blank (whitespace only)"
        notes.append(f"The {split} data ({source}): dropped {missing + blank} of {total} rows ({why}).")
        if counted > max_dropped_fraction * total:
            raise ValueError(
                f"the {split} data ({source}) lost {counted} of {total} rows ({counted / total:.1%}: {why}), more "
                f"than max_dropped_fraction={max_dropped_fraction}; check text_column={text_column!r}, fix the data, "
                "or raise max_dropped_fraction."
            )
    return kept, notes


def _unusable_counts(dataset: Dataset, text_column: str) -> tuple[int, int]:
    """(rows whose text is missing or null, rows whose text is whitespace only)."""
    missing = blank = 0
    for batch in dataset.select_columns([text_column]).iter(batch_size=ROWS_AT_ONCE):
        for text in batch[text_column]:
            missing += text is None
            blank += text is not None and not text.strip()
    return missing, blank


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


def text_column_of(dataset: Dataset, text_column: str) -> str:
    """`text_column` when the data has it as a text column; else an error listing the columns there are.
    The column is chosen by name only: no other column is ever trained on in its place."""
    columns = [column for column in dataset.column_names if column != TEXT_ENDS]
    if text_column not in columns:
        raise ValueError(f"text_column={text_column!r} is not a column of the data; its columns are {columns}. "
                         "Set text_column to the one holding the text.")  # fmt: skip
    feature = dataset.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"text_column={text_column!r} holds {getattr(feature, 'dtype', feature)} values, not text; "
                         f"the data's columns are {columns}.")  # fmt: skip
    return text_column


def column_chosen_by_older_versions(dataset: Dataset) -> str | None:
    """The column versions before text_column's default trained on when it was unset: `text` where the data
    had one, else its first text column (None: none, they refused the data)."""
    if "text" in dataset.column_names:
        return "text"
    texts = [column for column in dataset.column_names
             if getattr(dataset.features[column], "dtype", None) in ("string", "large_string")]  # fmt: skip
    return texts[0] if texts else None


def pack_blocks(splits: DatasetDict, tokenizer, text_column: str, block_size: int) -> DatasetDict:
    """Tokenize every text, join them with the tokenizer's separator, and cut the stream into blocks.

    The tail shorter than `block_size` is dropped, as in transformers' run_clm/run_mlm examples. Each
    split's blocks are written to disk as they fill (the `datasets` cache), so memory does not grow
    with the data.
    """
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if separator is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither an eos_token nor a sep_token to separate texts.")
    features = Features({"input_ids": Sequence(Value("int32")), "attention_mask": Sequence(Value("int8"))})
    packed = DatasetDict()
    for split, texts in splits.items():
        arguments = {"texts": texts, "tokenizer": tokenizer, "text_column": text_column, "block_size": block_size,
                     "separator": separator}  # fmt: skip
        fingerprint = Hasher.hash(["blocks", 1, texts._fingerprint, Hasher.hash(tokenizer), text_column, block_size])
        try:
            packed[split] = Dataset.from_generator(_blocks, features=features, gen_kwargs=arguments,
                                                   fingerprint=fingerprint)  # fmt: skip
        except Exception:
            # `datasets` refuses a generator that yields nothing with its own words: count, and say why.
            tokens = sum(len(ids) for ids in _token_runs(texts, tokenizer, text_column, separator))
            if tokens >= block_size:
                raise
            raise ValueError(
                f"the {split} split yields no block of block_size={block_size} tokens ({tokens} tokens in all); "
                "use a smaller block_size or more data."
            ) from None
    return packed


def _blocks(texts: Dataset, tokenizer, text_column: str, block_size: int, separator: int) -> Iterator[dict]:
    stream: list[int] = []
    for ids in _token_runs(texts, tokenizer, text_column, separator):
        stream.extend(ids)
        usable = len(stream) // block_size * block_size
        for start in range(0, usable, block_size):
            yield {"input_ids": stream[start : start + block_size], "attention_mask": [1] * block_size}
        del stream[:usable]


def _token_runs(texts: Dataset, tokenizer, text_column: str, separator: int, max_chars: int = 1 << 20,
                max_texts: int = 1000) -> Iterator[list[int]]:  # fmt: skip
    """The token ids of the texts in order, the separator after each text that has any; at most about
    `max_chars` characters are tokenized at once."""
    text_has_tokens = False
    for batch in _batches(_joined_pieces(texts, tokenizer, text_column), max_chars, max_texts):
        encoded = token_ids(tokenizer, [piece for piece, _ in batch])
        for ids, (_, ends) in zip(encoded, batch):
            text_has_tokens = text_has_tokens or bool(ids)
            yield ids + [separator] if ends and text_has_tokens else ids
            text_has_tokens = text_has_tokens and not ends


def _batches(pieces: Iterable[tuple[str, bool]], max_chars: int, max_texts: int) -> Iterator[list[tuple[str, bool]]]:
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[0])
        if chars >= max_chars or len(batch) >= max_texts:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _joined_pieces(texts: Dataset, tokenizer, text_column: str) -> Iterator[tuple[str, bool]]:
    """(text or piece, ends its text), the pieces of a text joined again wherever the cut changes its tokens."""
    columns = [text_column, TEXT_ENDS] if TEXT_ENDS in texts.column_names else [text_column]
    pending = None
    for batch in texts.select_columns(columns).iter(batch_size=ROWS_AT_ONCE):
        for text, ends in zip(batch[text_column], batch.get(TEXT_ENDS) or [True] * len(batch[text_column])):
            if pending is not None and cuts_cleanly(tokenizer, pending, text):
                yield pending, False
                pending = None
            pending = text if pending is None else pending + text
            if ends:
                yield pending, True
                pending = None
    if pending is not None:
        yield pending, True


def cuts_cleanly(tokenizer, left: str, right: str, window: int = 64) -> bool:
    """Whether tokenizing `left` and `right` apart gives the tokens of `left + right` (judged on `window`
    characters either side of the cut: tokenizers split words at a newline, so that is where they differ)."""
    head, tail = left[-window:], right[:window]
    apart, joint = token_ids(tokenizer, [head, tail]), token_ids(tokenizer, [head + tail])[0]
    return apart[0] + apart[1] == joint


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids of each text without special tokens; through the Rust tokenizer's `encode_batch_fast`
    (no offsets, several times faster) where there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


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
