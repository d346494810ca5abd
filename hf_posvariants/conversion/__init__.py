"""Converters between transformers' own checkpoints and ours: `convert_deberta` (DeBERTa-v2/v3 → posvar_deberta),
`convert_diffllama` (DiffLlama → posvar_diff), `convert_llama_checkpoint` (Llama → posvar_llama), and
`convert_to_llama` / `export_llama` (a posvariants causal LM that is exactly a Llama → `LlamaForCausalLM`). They are
not remote-code files: each imports the transformers model it reads or writes. Each writes its output folder through
`output.model_folder_written` (new or empty unless overwriting an earlier conversion; written whole or not at all)."""

from .deberta import convert_deberta
from .diffllama import convert_diffllama
from .llama import check_exportable, convert_llama_checkpoint, convert_llama_config, convert_to_llama, export_llama

__all__ = [
    "check_exportable",
    "convert_deberta",
    "convert_diffllama",
    "convert_llama_checkpoint",
    "convert_llama_config",
    "convert_to_llama",
    "export_llama",
]
