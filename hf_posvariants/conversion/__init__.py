"""Converters from transformers' own checkpoints to ours: `convert_deberta` (DeBERTa-v2/v3 → posvar_deberta)
and `convert_diffllama` (DiffLlama → posvar_diff). They are not remote-code files: each imports the
transformers model it reads from."""

from .deberta import convert_deberta
from .diffllama import convert_diffllama

__all__ = ["convert_deberta", "convert_diffllama"]
