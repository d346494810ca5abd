"""Converters from transformers' own checkpoints to ours: `convert_deberta` (DeBERTa-v2/v3 → posvar_deberta),
`convert_diffllama` (DiffLlama → posvar_diff) and `convert_llama_checkpoint` (Llama → posvar_llama). They are not
remote-code files: each imports the transformers model it reads from."""

from .deberta import convert_deberta
from .diffllama import convert_diffllama
from .llama import convert_llama_checkpoint, convert_llama_config

__all__ = ["convert_deberta", "convert_diffllama", "convert_llama_checkpoint", "convert_llama_config"]
