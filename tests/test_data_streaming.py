"""Big text files in bounded memory: pieces read, tokenized and packed as the whole text would be."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from datasets import load_dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_posvariants.training import data
from hf_posvariants.training.tokenizer import train_causal_tokenizer, train_masked_tokenizer
from tests.test_training import ROOT

# Windows line ends, blank lines, indented lines, lines that start with a space (as in wikitext), tabs,
# runs of blank lines with spaces in them, and words long enough to be merged.
AWKWARD = (
    " = Heading = \r\n \r\n The first paragraph runs on\r\nover a line end and ends here . \r\n \r\n"
    "\tIndented  line with  two spaces\nplain line\n\n\n  \n\nAfter blank lines: numbers 12345 and 678.\n"
    "Überstraße, naïve café – dash — and “quotes”.\nlast line without an end"
)


def awkward_file(tmp_path: Path, copies: int = 20) -> Path:
    path = tmp_path / "awkward.txt"
    path.write_bytes("\n\n".join(f"{AWKWARD} {i}" for i in range(copies)).encode())
    return path


def whole_texts(path: Path, unit: str, piece_chars: int) -> list[str]:
    texts, current = [], ""
    for piece, ends in data.text_pieces(str(path), unit, piece_chars):
        current += piece
        if ends:
            texts.append(current)
            current = ""
    return texts


@pytest.mark.parametrize("unit", data.TEXT_UNITS)
def test_pieces_make_the_texts_of_the_datasets_text_builder(tmp_path, unit):
    path = awkward_file(tmp_path)
    expected = load_dataset("text", data_files=[str(path)], sample_by=unit, keep_linebreaks=True,
                            cache_dir=str(tmp_path / "cache"))["train"]["text"]  # fmt: skip
    for piece_chars in (40, 300, 1 << 20):
        assert whole_texts(path, unit, piece_chars) == list(expected)
    if unit == "document":  # a document is really cut, every cut after a newline
        pieces = list(data.text_pieces(str(path), unit, 300))
        assert len(pieces) > 10 and all(piece.endswith("\n") for piece, ends in pieces if not ends)


def prepend_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A tokenizer that marks the start of every string it is given (like SentencePiece's "▁" before the
    first word): cutting a text anywhere changes its tokens, so no cut may be kept."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>")


def reference_blocks(texts: list[str], tokenizer, block_size: int) -> list[list[int]]:
    """What packing did before pieces: each whole text tokenized at once, ended by the end token (a text
    with no tokens, say spaces only, is left out)."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [token for ids in encoded if ids for token in ids + [separator]]
    return [stream[start : start + block_size] for start in range(0, len(stream) // block_size * block_size, block_size)]


@pytest.mark.parametrize("unit", ["document", "paragraph"])
def test_packing_pieces_gives_the_blocks_and_tokenizers_of_whole_texts(tmp_path, monkeypatch, unit):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "PIECE_CHARS", 40)
    path = awkward_file(tmp_path)
    texts = whole_texts(path, unit, 1 << 20)
    splits = data.load_splits(None, None, str(path), None, 0.1, 0, 0, unit)
    assert len(splits["train"]) > 2 * len(texts)  # the texts were read in pieces
    pieces = data.TextColumn(splits["train"], "text")
    tokenizers = {
        "byte-level BPE": (train_causal_tokenizer(pieces, 400), train_causal_tokenizer(texts, 400)),
        "WordPiece": (train_masked_tokenizer(pieces, 400), train_masked_tokenizer(texts, 400)),
        "start-marking BPE": (prepend_tokenizer(texts),) * 2,
    }
    for name, (from_pieces, from_texts) in tokenizers.items():
        assert from_pieces.get_vocab() == from_texts.get_vocab(), name
        blocks = data.pack_blocks(splits, from_pieces, "text", 16)["train"]["input_ids"]
        assert blocks[:] == reference_blocks(texts, from_pieces, 16), name


def test_a_cut_is_kept_only_where_the_tokens_stay_the_same(tmp_path):
    byte_level = train_causal_tokenizer([AWKWARD] * 5, 300)
    assert data.cuts_cleanly(byte_level, "words end here .\n", "Next line")
    assert not data.cuts_cleanly(byte_level, "a plain li", "ne here")  # " line" is one token
    marking = prepend_tokenizer([AWKWARD] * 5)
    assert not data.cuts_cleanly(marking, "words end here .\n", "Next line")


@pytest.mark.slow
def test_a_200_mb_text_file_trains_in_the_memory_of_a_20_mb_one(tmp_path):
    """scripts/bench_data_memory.py at 20 and 200 MiB: the memory a run holds may not grow with the file
    (it was 4.7 GB at 20 MB and passed 8 GB at 200 MB when a document was read and tokenized whole).
    Anonymous memory is what is held; the Arrow files `datasets` maps in add page cache the kernel
    can drop, which grows with what was read."""
    bench = runpy.run_path(str(ROOT / "scripts" / "bench_data_memory.py"))
    small, large = bench["main"](["--sizes-mb", "20", "200", "--work-dir", str(tmp_path), "--steps", "2"])
    assert large["blocks"] > 9 * small["blocks"]
    assert large["peak_anon_mb"] < small["peak_anon_mb"] + 150, (small, large)


@pytest.mark.slow
def test_training_on_the_blocks_of_1_gib_holds_the_memory_of_20_mb(tmp_path):
    """scripts/bench_data_memory.py --blocks: training on the 6.45 M blocks of a 1 GiB text (those of 20 MiB,
    repeated) peaked at 657 MiB of anonymous memory against 418 MiB on 20 MiB's 129 k blocks, when the
    Trainer's sampler held the shuffled order as a list of Python ints."""
    bench = runpy.run_path(str(ROOT / "scripts" / "bench_data_memory.py"))
    small, repeated = bench["main"](["--sizes-mb", "20", "--blocks", "6450000", "--work-dir", str(tmp_path),
                                     "--steps", "2"])  # fmt: skip
    assert repeated["blocks"] == 6_450_000
    assert repeated["training_anon_mb"] < small["training_anon_mb"] + 60, (small, repeated)
