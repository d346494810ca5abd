"""Tokenizers trained on the training data when a recipe names none.

Causal models get byte-level BPE (GPT-2 style: any byte sequence is representable, so nothing is
ever unknown); masked models get WordPiece with BERT's special tokens and [CLS] … [SEP] framing.
Both are returned as `PreTrainedTokenizerFast`, so `save_pretrained` writes `tokenizer.json` and
`AutoTokenizer.from_pretrained` loads it back without this package. The same texts always give the
same tokenizer, token ids included. Texts are fed to the trainers in batches of bounded size, so a
corpus of any size trains in bounded memory.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CAUSAL_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
MASKED_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def _batches(texts: Iterable[str], size: int = 1000, max_chars: int = 1 << 16) -> Iterator[list[str]]:
    """Lists of at most `size` texts and about `max_chars` characters. `train_from_iterator` reads 256 of
    them ahead, so their size bounds the memory of tokenizer training (it was 1 GiB with 4 MiB batches)."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _reiterable(texts: Iterable[str]) -> Iterable[str]:
    if iter(texts) is texts:
        raise TypeError("the masked tokenizer reads its texts twice: pass a list or a dataset column, not an iterator.")
    return texts


def train_causal_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <s>, </s>, <pad>, <unk>; no special tokens are added around a text."""
    specials = list(CAUSAL_SPECIALS.values())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_batches(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **CAUSAL_SPECIALS)


def _masked_pipeline(vocab: dict[str, int] | None = None) -> Tokenizer:
    """BERT's lower-casing normalizer and pre-tokenizer around a WordPiece model (empty, or with `vocab`)."""
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=MASKED_SPECIALS["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def continuation_tokens(texts: Iterable[str], tokenizer: Tokenizer, prefix: str = "##") -> list[str]:
    """`##c` for every character c of the normalized texts that can continue a word, in code-point order.

    The WordPiece trainer numbers these tokens in the order it meets them in a hash map, which differs
    from process to process, and breaks ties between equally frequent merges by those numbers; giving it
    them up front, sorted, makes the vocabulary and its ids depend on the texts alone.
    """
    chars: set[str] = set()
    for batch in _batches(texts):
        chars.update(tokenizer.normalizer.normalize_str("".join(batch)))
    # A character the pre-tokenizer cuts off on its own (space, punctuation, CJK) never continues a word.
    return [prefix + c for c in sorted(chars) if not unicodedata.category(c).startswith(("Z", "C"))
            and len(tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str("a" + c))) == 1]  # fmt: skip


def train_masked_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Lower-cased WordPiece with BERT's special tokens; a single text is framed as [CLS] … [SEP].

    `texts` is read twice (a list or a dataset column, not an iterator)."""
    texts = _reiterable(texts)
    specials = list(MASKED_SPECIALS.values())
    trained = _masked_pipeline()
    continuations = continuation_tokens(texts, trained)
    # The continuation tokens go in as the trainer's "special" tokens only to fix their ids; the tokenizer
    # is then rebuilt from the vocabulary so that only BERT's specials are special.
    trainer = trainers.WordPieceTrainer(vocab_size=max(vocab_size, len(specials) + len(continuations)),
                                        special_tokens=specials + continuations)  # fmt: skip
    trained.train_from_iterator(_batches(texts), trainer=trainer)
    tokenizer = _masked_pipeline(trained.get_vocab(with_added_tokens=False))
    tokenizer.add_special_tokens(specials)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **MASKED_SPECIALS)


def train_tokenizer(texts: Iterable[str], objective: str, vocab_size: int) -> PreTrainedTokenizerFast:
    if objective == "clm":
        return train_causal_tokenizer(texts, vocab_size)
    return train_masked_tokenizer(texts, vocab_size)
