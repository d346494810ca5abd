"""Text corpora and the byte-level tokenizer used by the measuring scripts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)


def read_corpus(path: str | Path) -> str:
    """A text file, with the Project Gutenberg licence header and footer removed when present."""
    text = Path(path).read_text(encoding="utf-8")
    start, end = GUTENBERG_START.search(text), GUTENBERG_END.search(text)
    if start:
        text = text[start.end():]
        end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def split_held_out(text: str, held_out_fraction: float) -> tuple[str, str]:
    """(training text, held-out text): the held-out part is the end of the text, so no window of
    training text overlaps it."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction={held_out_fraction} must lie in (0, 1).")
    cut = int(len(text) * (1.0 - held_out_fraction))
    return text[:cut], text[cut:]


def byte_tokenizer() -> ByT5Tokenizer:
    """Bytes as ids (offset by ByT5's three specials pad=0, eos=1, unk=2): needs no training, and it
    saves and loads with `AutoTokenizer` like any other tokenizer."""
    return ByT5Tokenizer(extra_ids=0)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """"bytes" for the byte-level tokenizer, otherwise anything `AutoTokenizer` loads (a checkpoint folder)."""
    if name_or_path == "bytes":
        return byte_tokenizer()
    return AutoTokenizer.from_pretrained(name_or_path)


def encode(text: str, tokenizer: PreTrainedTokenizerBase) -> torch.LongTensor:
    """A long text as one 1-D tensor of ids, without special tokens."""
    if isinstance(tokenizer, ByT5Tokenizer):
        # Same ids as the tokenizer (byte + 3), without a Python loop over three million characters.
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + 3)
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def blocks(tokens: torch.LongTensor, length: int, max_blocks: int | None = None) -> torch.LongTensor:
    """(N,) → (N // length, length), dropping the remainder."""
    count = tokens.numel() // length
    if max_blocks is not None:
        count = min(count, max_blocks)
    return tokens[: count * length].view(count, length)
