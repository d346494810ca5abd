"""hf_posvariants: transformer position-encoding and attention variants as Hugging Face models.

Importing the package registers every family with the Auto classes, so
`AutoModelForCausalLM.from_config(PosVarLlamaConfig(...))` and `AutoModel.from_pretrained(path)` work.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_differential import PosVarDiffConfig
from .configuration_posvariants import PosVarConfig, PosVarLlamaConfig, PosVarTransformerConfig
from .modeling_differential import (
    PosVarDiffForCausalLM,
    PosVarDiffForMaskedLM,
    PosVarDiffForSequenceClassification,
    PosVarDiffForTokenClassification,
    PosVarDiffModel,
)
from .configuration_deberta import PosVarDebertaConfig
from .modeling_deberta import (
    PosVarDebertaForMaskedLM,
    PosVarDebertaForSequenceClassification,
    PosVarDebertaForTokenClassification,
    PosVarDebertaModel,
)
from .modeling_posvariants import (
    PosVarForCausalLM,
    PosVarForMaskedLM,
    PosVarForSequenceClassification,
    PosVarForTokenClassification,
    PosVarLlamaForCausalLM,
    PosVarLlamaForMaskedLM,
    PosVarLlamaForSequenceClassification,
    PosVarLlamaForTokenClassification,
    PosVarLlamaModel,
    PosVarModel,
    PosVarPreTrainedModel,
    PosVarTransformerForCausalLM,
    PosVarTransformerForMaskedLM,
    PosVarTransformerForSequenceClassification,
    PosVarTransformerForTokenClassification,
    PosVarTransformerModel,
)
from .position_encodings import POSITION_ENCODINGS, PositionEncoding, register_position_encoding

__version__ = "0.1.0"

# Auto class → model class, per family config. Tests and the README's variant table read this too.
FAMILIES: dict[type[PosVarConfig], dict[type, type[PosVarPreTrainedModel]]] = {
    PosVarTransformerConfig: {
        AutoModel: PosVarTransformerModel,
        AutoModelForCausalLM: PosVarTransformerForCausalLM,
        AutoModelForMaskedLM: PosVarTransformerForMaskedLM,
        AutoModelForSequenceClassification: PosVarTransformerForSequenceClassification,
        AutoModelForTokenClassification: PosVarTransformerForTokenClassification,
    },
    PosVarLlamaConfig: {
        AutoModel: PosVarLlamaModel,
        AutoModelForCausalLM: PosVarLlamaForCausalLM,
        AutoModelForMaskedLM: PosVarLlamaForMaskedLM,
        AutoModelForSequenceClassification: PosVarLlamaForSequenceClassification,
        AutoModelForTokenClassification: PosVarLlamaForTokenClassification,
    },
    PosVarDiffConfig: {
        AutoModel: PosVarDiffModel,
        AutoModelForCausalLM: PosVarDiffForCausalLM,
        AutoModelForMaskedLM: PosVarDiffForMaskedLM,
        AutoModelForSequenceClassification: PosVarDiffForSequenceClassification,
        AutoModelForTokenClassification: PosVarDiffForTokenClassification,
    },
    PosVarDebertaConfig: {
        AutoModel: PosVarDebertaModel,
        AutoModelForMaskedLM: PosVarDebertaForMaskedLM,
        AutoModelForSequenceClassification: PosVarDebertaForSequenceClassification,
        AutoModelForTokenClassification: PosVarDebertaForTokenClassification,
    },
}


def register_family(config_class: type[PosVarConfig], models: dict[type, type[PosVarPreTrainedModel]]) -> None:
    """Register a config and its heads with the Auto classes (and for remote-code export)."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    for auto_class, model_class in models.items():
        auto_class.register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


for _config_class, _models in FAMILIES.items():
    register_family(_config_class, _models)

__all__ = [
    "FAMILIES",
    "POSITION_ENCODINGS",
    "PositionEncoding",
    "PosVarConfig",
    "PosVarDiffConfig",
    "PosVarDiffForCausalLM",
    "PosVarDiffForMaskedLM",
    "PosVarDiffForSequenceClassification",
    "PosVarDiffForTokenClassification",
    "PosVarDiffModel",
    "PosVarDebertaConfig",
    "PosVarDebertaForMaskedLM",
    "PosVarDebertaForSequenceClassification",
    "PosVarDebertaForTokenClassification",
    "PosVarDebertaModel",
    "PosVarForCausalLM",
    "PosVarForMaskedLM",
    "PosVarForSequenceClassification",
    "PosVarForTokenClassification",
    "PosVarLlamaConfig",
    "PosVarLlamaForCausalLM",
    "PosVarLlamaForMaskedLM",
    "PosVarLlamaForSequenceClassification",
    "PosVarLlamaForTokenClassification",
    "PosVarLlamaModel",
    "PosVarModel",
    "PosVarPreTrainedModel",
    "PosVarTransformerConfig",
    "PosVarTransformerForCausalLM",
    "PosVarTransformerForMaskedLM",
    "PosVarTransformerForSequenceClassification",
    "PosVarTransformerForTokenClassification",
    "PosVarTransformerModel",
    "register_family",
    "register_position_encoding",
]
