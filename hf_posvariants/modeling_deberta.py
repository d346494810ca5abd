"""DeBERTa (He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled Attention", ICLR 2021)
over the shared posvariants core, on every attention backend that takes an additive bias.

Disentangled attention scores a query i against a key j with content and relative-position parts:

    A[i, j] = (q_i·k_j + q_i·k^r[δ(i, j)] + k_j·q^r[δ(i, j)]) / sqrt(d · (1 + #position terms))
              (c2c)      (c2p)                (p2c)

with k^r, q^r the key/query projections of one relative-embedding table of 2k rows shared by all
layers, and δ(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1). The position terms are computed from the
[2k] projections and gathered into one pre-scaled (B, H, Q, K) bias, handed to transformers'
attention interface as `position_bias`; eager (ours), SDPA and flex all consume it.

Index convention: we follow the reference code (microsoft/DeBERTa, also transformers' DebertaV2),
so checkpoints carry over. It differs from the paper's equation 4 in the p2c term: the paper indexes
q^r with δ(j, i), the code with δ(i, j) (the same index as c2p); and with `position_buckets` the
distance i - j is log-bucketed (exact up to k/2, logarithmic up to `max_relative_positions`) before
the clamp, which the paper does not describe.

Enhanced Mask Decoder (section 3.2 of the paper, `emd_layers` > 0): the masked-LM head re-runs the
last encoder layer `emd_layers` times with its own weights shared, on the keys/values that entered
that layer, with the query starting as those states plus absolute position embeddings. As in the
reference code, this replaces the last layer's output for the MLM prediction only; the encoder's own
outputs are unchanged.
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention import PosVarAttention
from .configuration_deberta import PosVarDebertaConfig
from .modeling_posvariants import (
    PosVarBlock,
    PosVarForSequenceClassification,
    PosVarForTokenClassification,
    PosVarPreTrainedModel,
    build_norm,
    build_position_encoding,
    check_not_empty,
    positions_from_mask,
)

# The shared relative-embedding table (2k, hidden) and the index δ (Q, K) into it.
RelativePositions = tuple[torch.Tensor, torch.LongTensor]


def log_bucket(relative: torch.LongTensor, buckets: int, max_position: int) -> torch.LongTensor:
    """The reference's bucketing of signed distances: exact for |r| <= buckets // 2, then
    sign(r) · (mid + ceil(log(|r| / mid) / log((max_position - 1) / mid) · (mid - 1)))."""
    mid = buckets // 2
    distance = relative.abs()
    # Distances below mid take the exact branch; mid stands in for them so the log stays finite.
    safe = torch.where(distance < mid, torch.full_like(distance, mid), distance).float()
    logarithmic = torch.ceil(torch.log(safe / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return torch.where(distance <= mid, relative, (logarithmic * relative.sign()).long())


def relative_index(
    query_length: int, key_length: int, config: PosVarDebertaConfig, device: torch.device
) -> torch.LongTensor:
    """δ(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1), shape (Q, K)."""
    relative = torch.arange(query_length, device=device)[:, None] - torch.arange(key_length, device=device)[None, :]
    if config.position_buckets > 0:
        relative = log_bucket(relative, config.position_buckets, config.effective_max_relative_positions)
    span = config.relative_span
    return (relative + span).clamp(0, 2 * span - 1)


class DisentangledAttention(PosVarAttention):
    """Content-to-content attention plus the content→position (c2p) and position→content (p2c)
    terms of DeBERTa, as one additive bias; the content projections keep the core's q/k/v/o names."""

    def __init__(self, config: PosVarDebertaConfig, layer_idx: int, is_causal: bool = False):
        super().__init__(config, layer_idx, is_causal)
        self.position_terms = config.position_terms
        self.scaling = (self.head_dim * (1 + len(self.position_terms))) ** -0.5
        self.share_att_key = config.share_att_key
        width = self.num_heads * self.head_dim
        separate = not config.share_att_key
        self.pos_key_proj = nn.Linear(config.hidden_size, width) if separate and "c2p" in self.position_terms else None
        self.pos_query_proj = nn.Linear(config.hidden_size, width) if separate and "p2c" in self.position_terms else None
        self.position_dropout = nn.Dropout(config.hidden_dropout)

    def position_bias(
        self, query: torch.Tensor, key: torch.Tensor, relative: RelativePositions
    ) -> torch.Tensor:
        """(B, H, Q, K) bias, already multiplied by the attention scaling."""
        table, index = relative
        table = self.position_dropout(table)
        rows_shape = (table.shape[0], self.num_heads, self.head_dim)
        batch, heads, query_length, _ = query.shape
        key_length = key.shape[2]
        bias = None
        if "c2p" in self.position_terms:
            projection = self.k_proj if self.share_att_key else self.pos_key_proj
            # Scaling the 2k projected rows is cheaper than scaling the (B, H, Q, K) result.
            pos_key = (projection(table) * self.scaling).view(rows_shape).transpose(0, 1)  # (H, 2k, D)
            c2p = torch.matmul(query, pos_key.transpose(-1, -2))  # (B, H, Q, 2k)
            bias = c2p.gather(-1, index.expand(batch, heads, query_length, key_length))
        if "p2c" in self.position_terms:
            projection = self.q_proj if self.share_att_key else self.pos_query_proj
            pos_query = (projection(table) * self.scaling).view(rows_shape).transpose(0, 1)  # (H, 2k, D)
            p2c = torch.matmul(key, pos_query.transpose(-1, -2))  # (B, H, K, 2k)
            p2c = p2c.gather(-1, index.T.expand(batch, heads, key_length, query_length)).transpose(-1, -2)
            # In place: gather's backward does not need its output, so the sum costs no extra (B, H, Q, K).
            bias = p2c if bias is None else bias.add_(p2c)
        return bias

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        relative: RelativePositions | None = None,
        key_value_states: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention, or with `key_value_states` (the Enhanced Mask Decoder) queries from
        `hidden_states` against keys and values from `key_value_states`."""
        source = hidden_states if key_value_states is None else key_value_states
        query = self.q_proj(hidden_states).view(*hidden_states.shape[:-1], -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(source).view(*source.shape[:-1], -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(source).view(*source.shape[:-1], -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if self.position_terms:
            kwargs["position_bias"] = self.position_bias(query, key, relative)
        return self.attend(query, key, value, attention_mask, **kwargs)


class DebertaLayer(PosVarBlock):
    """The core block with disentangled attention; `query_states` lets the Enhanced Mask Decoder
    attend from its own queries to the layer's input, the residual running through the queries."""

    def build_attention(self, config, layer_idx, is_causal):
        return DisentangledAttention(config, layer_idx, is_causal)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        relative: RelativePositions | None = None,
        query_states: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        key_value_states = None
        if query_states is not None:
            key_value_states = self.input_layernorm(hidden_states) if self.pre_norm else hidden_states

        def attend(x: torch.Tensor) -> torch.Tensor:
            return self.self_attn(x, attention_mask, relative, key_value_states, **kwargs)[0]

        hidden_states = self.residual(hidden_states if query_states is None else query_states, attend, self.input_layernorm)
        return self.residual(hidden_states, self.mlp, self.post_attention_layernorm)


@dataclass
class DebertaModelOutput(BaseModelOutput):
    """`last_layer_input`: the states entering the last layer, the keys/values of the Enhanced Mask Decoder."""

    last_layer_input: torch.Tensor | None = None


class PosVarDebertaPreTrainedModel(PosVarPreTrainedModel):
    config: PosVarDebertaConfig
    config_class = PosVarDebertaConfig
    _no_split_modules = ["DebertaLayer"]
    _supports_flash_attn = False  # the position terms are a score bias, which flash kernels cannot add
    _can_record_outputs = {"hidden_states": DebertaLayer, "attentions": DisentangledAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PosVarDebertaForMaskedLM):
            init.zeros_(module.lm_head.bias)


class PosVarDebertaModel(PosVarDebertaPreTrainedModel):
    """The DeBERTa encoder: token (+ absolute position) embeddings, LayerNorm, disentangled layers.

    Parameter names are the core's plus `embed_norm` (embedding LayerNorm), `rel_embeddings` (the
    shared table of 2k relative embeddings) and `rel_norm` (its LayerNorm, `norm_rel_ebd="layer_norm"`).
    """

    def __init__(self, config: PosVarDebertaConfig, is_causal: bool | None = None):
        super().__init__(config)
        if is_causal or config.is_decoder:
            raise ValueError("posvar_deberta is a bidirectional encoder: is_decoder=True is not supported.")
        self.is_causal = False
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embedding_scale = config.hidden_size**0.5 if config.scale_embeddings else 1.0
        self.position_encoding = build_position_encoding(config, is_causal=False)
        self.embed_norm = build_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.rel_embeddings = nn.Embedding(2 * config.relative_span, config.hidden_size) if config.relative_attention else None
        self.rel_norm = build_norm(config) if config.norm_rel_ebd == "layer_norm" else nn.Identity()
        self.layers = nn.ModuleList([DebertaLayer(config, index, False) for index in range(config.num_hidden_layers)])
        self.norm = build_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def relative_positions(self, length: int, device: torch.device) -> RelativePositions | None:
        if self.rel_embeddings is None:
            return None
        return self.rel_norm(self.rel_embeddings.weight), relative_index(length, length, self.config, device)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DebertaModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        check_not_empty(input_ids, inputs_embeds)
        self.config.check_attention_backend()
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, length = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, torch.arange(length, device=inputs_embeds.device), batch_size)
        hidden_states = self.position_encoding.add_to_embeddings(inputs_embeds * self.embedding_scale, position_ids)
        hidden_states = self.dropout(self.embed_norm(hidden_states))
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        relative = self.relative_positions(length, inputs_embeds.device)

        last_layer_input = hidden_states
        for layer in self.layers:
            last_layer_input = hidden_states
            hidden_states = layer(hidden_states, attention_mask=mask, relative=relative, **kwargs)
        return DebertaModelOutput(last_hidden_state=self.norm(hidden_states), last_layer_input=last_layer_input)


class EnhancedMaskDecoder(nn.Module):
    """Absolute positions enter right before decoding (He et al. 2021, section 3.2): the encoder's last
    layer, weights shared, runs `emd_layers` times with the query starting at its input plus the
    absolute position embedding of each token, and keys/values fixed to that input."""

    def __init__(self, config: PosVarDebertaConfig):
        super().__init__()
        self.num_layers = config.emd_layers
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(
        self,
        layer: DebertaLayer,
        key_value_states: torch.Tensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        relative: RelativePositions | None,
    ) -> torch.Tensor:
        query_states = key_value_states + self.position_embeddings(position_ids)
        for _ in range(self.num_layers):
            query_states = layer(key_value_states, attention_mask=attention_mask, relative=relative, query_states=query_states)
        return query_states


class MaskedLMTransform(nn.Module):
    """dense → activation → LayerNorm, before the tied output embeddings (BERT's prediction head)."""

    def __init__(self, config: PosVarDebertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.act_fn(self.dense(hidden_states)))


class PosVarDebertaForMaskedLM(PosVarDebertaPreTrainedModel):
    """Masked language model with DeBERTa's Enhanced Mask Decoder (`emd_layers` > 0) and prediction
    head: transform, then the word embeddings (tied) plus a per-token bias."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PosVarDebertaConfig):
        super().__init__(config)
        self.model = PosVarDebertaModel(config)
        self.emd = EnhancedMaskDecoder(config) if config.emd_layers > 0 else None
        self.transform = MaskedLMTransform(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def decode(
        self, outputs: DebertaModelOutput, attention_mask: torch.Tensor | None, position_ids: torch.LongTensor | None
    ) -> torch.Tensor:
        """The states the prediction head reads: the encoder output, or the Enhanced Mask Decoder's."""
        if self.emd is None:
            return outputs.last_hidden_state
        kv = outputs.last_layer_input
        batch_size, length = kv.shape[:2]
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, torch.arange(length, device=kv.device), batch_size)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=kv, attention_mask=attention_mask)
        relative = self.model.relative_positions(length, kv.device)
        return self.model.norm(self.emd(self.model.layers[-1], kv, position_ids, mask, relative))

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        logits = self.lm_head(self.transform(self.decode(outputs, attention_mask, position_ids)))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class PosVarDebertaForSequenceClassification(PosVarForSequenceClassification):
    config_class = PosVarDebertaConfig
    base_model_class = PosVarDebertaModel
    _supports_flash_attn = False
    _can_record_outputs = PosVarDebertaPreTrainedModel._can_record_outputs


class PosVarDebertaForTokenClassification(PosVarForTokenClassification):
    config_class = PosVarDebertaConfig
    base_model_class = PosVarDebertaModel
    _supports_flash_attn = False
    _can_record_outputs = PosVarDebertaPreTrainedModel._can_record_outputs
