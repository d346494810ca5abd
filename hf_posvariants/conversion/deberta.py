"""Convert transformers' DeBERTa-v2/v3 checkpoints (`DebertaV2Model`, `DebertaV2ForMaskedLM`) to posvar_deberta.

The renaming is one table (`PARAMETER_RENAMES`): transformers' BERT-style module names become the
core's Llama-style ones, everything else (shapes, values, relative-index convention) is unchanged.
transformers has no Enhanced Mask Decoder, so converted masked-LM models default to `emd_layers=0`,
which reproduces transformers' logits; with `emd_layers>0` the decoder's absolute position table
starts untrained.
Not part of the remote-code files: imports transformers' DeBERTa classes freely.
"""

from __future__ import annotations

import re

import torch
from transformers import DebertaV2Config

from ..configuration_deberta import PosVarDebertaConfig
from ..modeling_deberta import PosVarDebertaForMaskedLM, PosVarDebertaModel

# (pattern on transformers' name, replacement in ours); applied in order, first match wins.
PARAMETER_RENAMES: list[tuple[str, str]] = [
    (r"^deberta\.embeddings\.word_embeddings\.", "model.embed_tokens."),
    (r"^deberta\.embeddings\.position_embeddings\.", "model.position_encoding.embeddings."),
    (r"^deberta\.embeddings\.LayerNorm\.", "model.embed_norm."),
    (r"^deberta\.encoder\.rel_embeddings\.", "model.relative_positions.embeddings."),
    (r"^deberta\.encoder\.LayerNorm\.", "model.relative_positions.norm."),
    (r"^deberta\.encoder\.layer\.(\d+)\.attention\.self\.query_proj\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^deberta\.encoder\.layer\.(\d+)\.attention\.self\.key_proj\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^deberta\.encoder\.layer\.(\d+)\.attention\.self\.value_proj\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^deberta\.encoder\.layer\.(\d+)\.attention\.self\.pos_key_proj\.", r"model.layers.\1.self_attn.pos_key_proj."),
    (r"^deberta\.encoder\.layer\.(\d+)\.attention\.self\.pos_query_proj\.", r"model.layers.\1.self_attn.pos_query_proj."),
    (r"^deberta\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^deberta\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"model.layers.\1.input_layernorm."),
    (r"^deberta\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"model.layers.\1.mlp.up_proj."),
    (r"^deberta\.encoder\.layer\.(\d+)\.output\.dense\.", r"model.layers.\1.mlp.down_proj."),
    (r"^deberta\.encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"model.layers.\1.post_attention_layernorm."),
    # The masked-LM head, legacy (`cls.predictions`) and current (`lm_predictions.lm_head`) layouts.
    (r"^cls\.predictions\.transform\.dense\.", "transform.dense."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "transform.layer_norm."),
    (r"^cls\.predictions\.bias$", "lm_head.bias"),
    (r"^lm_predictions\.lm_head\.dense\.", "transform.dense."),
    (r"^lm_predictions\.lm_head\.LayerNorm\.", "transform.layer_norm."),
    (r"^lm_predictions\.lm_head\.bias$", "lm_head.bias"),
]
# Tied to the word embeddings (or to `cls.predictions.bias`) in transformers; ours ties `lm_head.weight`.
TIED_IN_TRANSFORMERS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def convert_deberta_config(config: DebertaV2Config, emd_layers: int = 0) -> PosVarDebertaConfig:
    """The posvar_deberta config computing what `config` computes (with the EMD off by default)."""
    unsupported = {
        "type_vocab_size": getattr(config, "type_vocab_size", 0) > 0,
        "conv_kernel_size": getattr(config, "conv_kernel_size", 0) > 0,
        "embedding_size": getattr(config, "embedding_size", config.hidden_size) != config.hidden_size,
    }
    for field, present in unsupported.items():
        if present:
            raise ValueError(
                f"DeBERTa {field}={getattr(config, field)!r} is not supported by posvar_deberta "
                "(allowed: type_vocab_size=0, conv_kernel_size=0, embedding_size=hidden_size)."
            )
    pos_att_type = list(config.pos_att_type or [])
    return PosVarDebertaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        position_encoding="learned" if config.position_biased_input else "nope",
        norm_eps=config.layer_norm_eps,
        hidden_dropout=float(config.hidden_dropout_prob),
        attention_dropout=float(config.attention_probs_dropout_prob),
        initializer_range=config.initializer_range,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        relative_attention=config.relative_attention,
        pos_att_type=pos_att_type,
        max_relative_positions=config.max_relative_positions if config.max_relative_positions > 0 else -1,
        position_buckets=getattr(config, "position_buckets", -1),
        share_att_key=getattr(config, "share_att_key", False),
        norm_rel_ebd="layer_norm" if "layer_norm" in getattr(config, "norm_rel_ebd", "none") else "none",
        emd_layers=emd_layers,
    )


def rename(name: str) -> str | None:
    """Our name for a transformers parameter, None for the tied copies we do not store."""
    if name in TIED_IN_TRANSFORMERS:
        return None
    for pattern, replacement in PARAMETER_RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ValueError(f"No posvar_deberta parameter for transformers' DeBERTa parameter {name!r}.")


def convert_deberta_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a `DebertaV2ForMaskedLM` or `DebertaV2Model` state dict (bare-model keys lack the
    `deberta.` prefix; they are accepted too) to posvar_deberta's masked-LM names."""
    converted = {}
    for name, tensor in state_dict.items():
        if not name.startswith(("deberta.", "cls.", "lm_predictions.", "mask_predictions.")):
            name = f"deberta.{name}"
        if name.startswith("mask_predictions.") or name.endswith("embeddings.position_ids"):
            continue  # the replaced-token-detection head of v3 and a derived buffer
        target = rename(name)
        if target is not None:
            converted[target] = tensor
    return converted


def convert_deberta(model, emd_layers: int = 0):
    """A posvar_deberta model with the weights of a transformers `DebertaV2ForMaskedLM` (→ our masked LM)
    or `DebertaV2Model` (→ our base model)."""
    config = convert_deberta_config(model.config, emd_layers=emd_layers)
    state_dict = convert_deberta_state_dict(model.state_dict())
    is_masked_lm = any(name.startswith("transform.") for name in state_dict)
    if is_masked_lm:
        target = PosVarDebertaForMaskedLM(config)
    else:
        target = PosVarDebertaModel(config)
        state_dict = {name.removeprefix("model."): tensor for name, tensor in state_dict.items()}
    missing, unexpected = target.load_state_dict(state_dict, strict=False)
    allowed_missing = {"lm_head.weight"} | {name for name in missing if name.startswith("emd.")}
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(f"Conversion left missing={sorted(set(missing) - allowed_missing)} unexpected={sorted(unexpected)}.")
    if is_masked_lm:
        target.tie_weights()
    return target.to(next(model.parameters()).dtype)
