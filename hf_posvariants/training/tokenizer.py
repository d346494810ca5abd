"""Tokenizers trained on the training data when a recipe names none.

Causal models get byte-level BPE (GPT-2 style: any byte sequence is representable, so nothing is
ever unknown); masked models get WordPiece with BERT's special tokens and [CLS] … [SEP] framing.
Both are returned as `PreTrainedTokenizerFast`, so `save_pretrained` writes `tokenizer.json` and
`AutoTokenizer.from_pretrained` loads it back without this package.
"""

from __future__ import annotations

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


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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


def train_masked_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Lower-cased WordPiece with BERT's special tokens; a single text is framed as [CLS] … [SEP]."""
    specials = list(MASKED_SPECIALS.values())
    tokenizer = Tokenizer(models.WordPiece(unk_token=MASKED_SPECIALS["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    tokenizer.train_from_iterator(_batches(texts), trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **MASKED_SPECIALS)


def train_tokenizer(texts: Iterable[str], objective: str, vocab_size: int) -> PreTrainedTokenizerFast:
    if objective == "clm":
        return train_causal_tokenizer(texts, vocab_size)
    return train_masked_tokenizer(texts, vocab_size)
