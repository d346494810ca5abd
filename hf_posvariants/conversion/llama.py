"""Conversion from transformers' `LlamaForCausalLM` to `PosVarLlamaForCausalLM`.

posvar_llama keeps Llama's parameter names, so the state dict loads as it is; the config is translated field by
field (`LLAMA_FIELDS`, shared with DiffLlama's converter, whose block is Llama's).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..configuration_posvariants import PosVarLlamaConfig

# Config field of a Llama-block model in transformers → ours, where the two differ only in name or not at all.
LLAMA_FIELDS = {
    **{
        name: name
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
            "attention_bias", "attention_dropout",
        )
    },
    "rms_norm_eps": "norm_eps",
}  # fmt: skip


def convert_llama_config(config: LlamaConfig) -> PosVarLlamaConfig:
    """The posvar_llama config computing what `LlamaForCausalLM(config)` computes."""
    fields = {ours: getattr(config, theirs) for theirs, ours in {**LLAMA_FIELDS, "mlp_bias": "mlp_bias"}.items()}
    fields["rope_parameters"] = dict(config.rope_parameters)
    return PosVarLlamaConfig(**fields)


def convert_llama_checkpoint(source: str | Path, destination: Path, tokenizer: str | Path | None = None) -> PosVarLlamaConfig:
    """Write `source` (a LlamaForCausalLM or posvar_llama folder) as a posvar_llama checkpoint with its tokenizer."""
    config = AutoConfig.from_pretrained(source)
    if config.model_type == "llama":
        llama = LlamaForCausalLM.from_pretrained(source)
        model = AutoModelForCausalLM.from_config(convert_llama_config(config))
        model.load_state_dict(llama.state_dict(), strict=True)  # identical names; a missing key is an error
    elif config.model_type == "posvar_llama":
        model = AutoModelForCausalLM.from_pretrained(source)
    else:
        raise ValueError(f"model_type={config.model_type!r} is not supported; allowed values are ['llama', 'posvar_llama'].")
    model.save_pretrained(destination)
    AutoTokenizer.from_pretrained(tokenizer or source).save_pretrained(destination)
    return model.config
