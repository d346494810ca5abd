"""DeBERTa (He et al., "DeBERTa: Decoding-enhanced BERT with Disentangled Attention", ICLR 2021) as a
variant of the shared posvariants core: the `deberta_relative` position encoding (a shared table of 2k
relative embeddings, log-bucketed distances) consumed by the `disentangled` attention variant, on every
attention backend that can add a score bias (eager, SDPA, flex).

What is DeBERTa's own here: a LayerNorm on the embeddings (`embed_norm`), and the masked-LM head with the
Enhanced Mask Decoder (section 3.2 of the paper, `emd_layers` > 0): the head re-runs the last encoder
layer `emd_layers` times with its own weights shared, on the keys/values that entered that layer, with the
query starting as those states plus absolute position embeddings. As in the reference code, this replaces
the last layer's output for the MLM prediction only; the encoder's own outputs are unchanged.
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_deberta import PosVarDebertaConfig
from .modeling_posvariants import (
    PosVarEncoderHead,
    PosVarForMaskedLM,
    PosVarForSequenceClassification,
    PosVarForTokenClassification,
    PosVarModel,
    PosVarPreTrainedModel,
    build_norm,
    positions_from_mask,
)


class PosVarDebertaPreTrainedModel(PosVarPreTrainedModel):
    config: PosVarDebertaConfig
    config_class = PosVarDebertaConfig

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PosVarDebertaForMaskedLM):
            init.zeros_(module.lm_head.bias)


class PosVarDebertaModel(PosVarDebertaPreTrainedModel, PosVarModel):
    """The DeBERTa encoder: the shared bidirectional stack with a LayerNorm after the embeddings.

    Parameter names are the core's plus `embed_norm`; the relative table lives in the
    `relative_positions` encoding (`embeddings`, and `norm` when `norm_rel_ebd="layer_norm"`).
    """

    def __init__(self, config: PosVarDebertaConfig, is_causal: bool | None = None):
        if is_causal or config.is_decoder:
            raise ValueError("posvar_deberta is a bidirectional encoder: is_decoder=True is not supported.")
        super().__init__(config, is_causal=False)

    @staticmethod
    def embedding_norm(config: PosVarDebertaConfig) -> nn.Module:
        return build_norm(config)


class EnhancedMaskDecoder(nn.Module):
    """Absolute positions enter right before decoding (He et al. 2021, section 3.2): the encoder's last
    layer, weights shared, runs `emd_layers` times with the query starting at its input plus the
    absolute position embedding of each token, and keys/values fixed to that input."""

    def __init__(self, config: PosVarDebertaConfig):
        super().__init__()
        self.num_layers = config.emd_layers
        self.max_positions = config.max_position_embeddings
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def check_length(self, length: int) -> None:
        if length > self.max_positions:
            raise ValueError(
                f"The Enhanced Mask Decoder (emd_layers={self.num_layers}) has absolute positions for "
                f"max_position_embeddings={self.max_positions} tokens, but the input has {length}; use inputs of at "
                "most that length, a larger max_position_embeddings, or emd_layers=0 (no decoder)."
            )

    def forward(self, key_value_states: torch.Tensor, position_ids: torch.LongTensor) -> torch.Tensor:
        """The decoder's first queries: the states entering the last layer plus absolute position embeddings."""
        return key_value_states + self.position_embeddings(position_ids)


class MaskedLMTransform(nn.Module):
    """dense → activation → LayerNorm, before the tied output embeddings (BERT's prediction head)."""

    def __init__(self, config: PosVarDebertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.act_fn(self.dense(hidden_states)))


class PosVarDebertaForMaskedLM(PosVarDebertaPreTrainedModel, PosVarEncoderHead):
    """Masked language model with DeBERTa's Enhanced Mask Decoder (`emd_layers` > 0) and prediction
    head: transform, then the word embeddings (tied) plus a per-token bias."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # The tied head is the embedding's parameter, so it is sharded as the embedding is (a plan, like the other heads',
    # that `check_tensor_parallel` leaves unused while disentangled attention refuses tensor parallelism).
    _tp_plan = {"lm_head": "colwise_gather_output"}
    output_class = MaskedLMOutput

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
        self, last_layer_input: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.LongTensor | None
    ) -> torch.Tensor:
        """The Enhanced Mask Decoder's states, from the states that entered the encoder's last layer."""
        batch_size, length = last_layer_input.shape[:2]
        self.emd.check_length(length)
        slots = torch.arange(length, device=last_layer_input.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, slots, batch_size)
        mask = self.model.build_mask(last_layer_input, attention_mask, None, position_ids)
        positions, mask = self.model.compute_positions(last_layer_input, position_ids, slots, slots, mask)
        layer, states = self.model.layers[-1], self.emd(last_layer_input, position_ids)
        for _ in range(self.emd.num_layers):
            # The block itself (not its sublayers) runs, so offloading hooks and checkpointing see every call.
            states = layer.run(states, mask, positions, None, last_layer_input)
        return self.model.norm(states)

    head_loss = PosVarForMaskedLM.head_loss

    def run_base_model(self, **inputs):
        """The encoder's outputs, with `last_hidden_state` the decoder's states when there is a decoder: it reads the
        states entering the last layer (the second-to-last hidden state), recorded for it whatever the caller asked."""
        if self.emd is None:
            return super().run_base_model(**inputs)
        wanted = inputs.pop("output_hidden_states", None) or self.config.output_hidden_states
        selection = None if isinstance(wanted, bool) else [wanted] if isinstance(wanted, int) else list(wanted)
        recorded = True if wanted is True else [*(selection or []), -2]
        outputs = self.model(use_cache=False, output_hidden_states=recorded, **inputs)
        hidden_states = outputs.hidden_states
        outputs.last_hidden_state = self.decode(hidden_states[-2], inputs.get("attention_mask"), inputs.get("position_ids"))
        if not wanted:
            outputs.hidden_states = None
        elif selection is not None:  # the second-to-last state only where the caller selected it too
            kept = {index % len(hidden_states) for index in selection}
            outputs.hidden_states = tuple(state if i in kept else None for i, state in enumerate(hidden_states))
        return outputs

    def logits(self, outputs, attention_mask, position_ids):
        return self.lm_head(self.transform(outputs.last_hidden_state))


class PosVarDebertaForSequenceClassification(PosVarDebertaPreTrainedModel, PosVarForSequenceClassification):
    base_model_class = PosVarDebertaModel


class PosVarDebertaForTokenClassification(PosVarDebertaPreTrainedModel, PosVarForTokenClassification):
    base_model_class = PosVarDebertaModel
