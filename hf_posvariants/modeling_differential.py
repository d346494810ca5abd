"""The posvar_diff family: the shared heads bound to `PosVarDiffConfig` (differential attention, LLaMA block).
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

from transformers.generation import GenerationMixin

from .configuration_differential import PosVarDiffConfig
from .modeling_posvariants import (
    PosVarForCausalLM,
    PosVarForMaskedLM,
    PosVarForSequenceClassification,
    PosVarForTokenClassification,
    PosVarModel,
)


class PosVarDiffModel(PosVarModel):
    config_class = PosVarDiffConfig


class PosVarDiffForCausalLM(PosVarForCausalLM, GenerationMixin):
    config_class = PosVarDiffConfig


class PosVarDiffForMaskedLM(PosVarForMaskedLM):
    config_class = PosVarDiffConfig


class PosVarDiffForSequenceClassification(PosVarForSequenceClassification):
    config_class = PosVarDiffConfig


class PosVarDiffForTokenClassification(PosVarForTokenClassification):
    config_class = PosVarDiffConfig
