"""Configuration of posvar_deberta: DeBERTa's disentangled attention over the shared posvariants core.

The DeBERTa-specific keys carry the names of transformers' `DebertaV2Config` (relative_attention,
pos_att_type, position_buckets, max_relative_positions, share_att_key, norm_rel_ebd) with the same
meaning, so a DeBERTa-v2/v3 config translates key by key (see `conversion/deberta.py`).
This file imports only torch, transformers and huggingface_hub (a dependency of transformers): it travels
with remote-code checkpoints.
"""

from __future__ import annotations

from typing import ClassVar

from huggingface_hub.dataclasses import strict

from .components import POSITION_ENCODINGS
from .configuration_posvariants import PosVarConfig
from .validation import choice_error

# Where position enters the input embeddings (DeBERTa-v2's `position_biased_input`): a learned table
# ("learned", v1/v2) or nothing ("nope", v3); any other absolute scheme of the registry also fits.
INPUT_POSITION_KINDS = ("absolute", "none")


@strict
class PosVarDebertaConfig(PosVarConfig):
    r"""
    DeBERTa (He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled Attention", ICLR 2021).
    Defaults follow DeBERTa-v3: no absolute positions at the input, 256 log buckets, shared keys.
    The components validate their own fields: the `disentangled` attention variant `relative_attention`,
    `pos_att_type` and `share_att_key`, the `deberta_relative` encoding the rest of the relative-position fields
    (only while `relative_attention` is on, as an encoding not in use is not checked); this class checks what
    the family itself decides.

    Args:
        relative_attention (`bool`): add the disentangled position terms to the attention scores.
        pos_att_type (`list[str]` or `str`): the position terms, any subset of ["c2p", "p2c"]
            (content→position, position→content); "c2p|p2c" strings are accepted as in transformers.
        max_relative_positions (`int`): clip relative distances at k = this value; -1 means
            max_position_embeddings.
        position_buckets (`int`): when > 0, log-bucket distances into this many buckets per side
            (the span k becomes `position_buckets`); -1 keeps exact distances clipped at k.
        share_att_key (`bool`): project the relative embeddings with the content q/k projections
            instead of separate `pos_key_proj` / `pos_query_proj`.
        norm_rel_ebd (`str`): "layer_norm" normalises the shared relative-embedding table, "none" not.
        emd_layers (`int`): how many times the Enhanced Mask Decoder re-applies the last encoder layer
            in the masked-LM head; 0 turns the decoder off.
        position_encoding (`str`): absolute positions added at the input: "nope" (DeBERTa-v3,
            `position_biased_input=False`) or "learned" (v2, `position_biased_input=True`).
    """

    model_type = "posvar_deberta"
    weight_fields: ClassVar[dict[str, str]] = {
        **PosVarConfig.weight_fields,
        "relative_positions.embeddings.": "relative_attention",
        "relative_positions.norm.": "norm_rel_ebd",
        "pos_key_proj.": "share_att_key",
        "pos_query_proj.": "share_att_key",
    }

    vocab_size: int = 128100
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    position_encoding: str = "nope"
    attention_variant: str = "disentangled"
    norm_eps: float = 1e-7
    scale_embeddings: bool = False
    pad_token_id: int | None = 0
    relative_attention: bool = True
    pos_att_type: str | list[str] = "c2p|p2c"
    max_relative_positions: int = -1
    position_buckets: int = 256
    share_att_key: bool = True
    norm_rel_ebd: str = "layer_norm"
    emd_layers: int = 2

    def __post_init__(self, **kwargs):
        if isinstance(self.pos_att_type, str):
            self.pos_att_type = [term.strip() for term in self.pos_att_type.lower().split("|") if term.strip()]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        if self.position_encoding_class.kind not in INPUT_POSITION_KINDS:
            allowed = [name for name, cls in POSITION_ENCODINGS.items() if cls.kind in INPUT_POSITION_KINDS]
            raise choice_error("position_encoding", self.position_encoding, allowed)
        if self.attention_variant != "disentangled":
            raise choice_error("attention_variant", self.attention_variant, ["disentangled"])
        if self.is_decoder:
            raise ValueError("is_decoder=True is not supported by posvar_deberta, a bidirectional encoder; allowed value is False.")
        if self.emd_layers < 0:
            raise ValueError(f"emd_layers={self.emd_layers} must be 0 (decoder off) or a positive integer.")
