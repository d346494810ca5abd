"""transformers' own common model tests (`ModelTesterMixin`, from the installed version's source distribution: see
upstream_model_tests.py) over every registered model type, with its default encoding, and over every bias encoding."""

from __future__ import annotations

import unittest
from unittest import mock

import pytest
from conftest import tiny_config
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.models.auto import modeling_auto

from hf_posvariants import FAMILIES, PosVarLlamaConfig
from hf_posvariants.position_encodings import POSITION_ENCODINGS, selectable_position_encodings

pytest.importorskip("parameterized", reason="transformers' test_modeling_common needs it: pip install -e '.[dev]'")
from upstream_model_tests import UpstreamTestsUnavailable, load_test_modeling_common  # noqa: E402

try:
    common = load_test_modeling_common()
except UpstreamTestsUnavailable as error:
    pytest.skip(str(error), allow_module_level=True)


class PosVarModelTester:
    """What ModelTesterMixin asks of a model tester: a tiny config and a batch of inputs for it."""

    batch_size = 2
    seq_length = 7
    is_training = True

    def __init__(self, parent: unittest.TestCase, config_class: type, encoding: str):
        self.parent, self.config_class, self.encoding = parent, config_class, encoding
        config = self.get_config()
        self.vocab_size, self.hidden_size = config.vocab_size, config.hidden_size
        self.num_hidden_layers, self.num_attention_heads = config.num_hidden_layers, config.num_attention_heads

    def get_config(self):
        return tiny_config(self.config_class, self.encoding)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], config.vocab_size)
        attention_mask = common.random_attention_mask([self.batch_size, self.seq_length])
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


# The tests tell a head's task by its class name in transformers' name tables, which list transformers' own models;
# registering a family with the Auto classes does not add to them, so each test case adds its family while it runs.
NAME_TABLES = {
    AutoModel: modeling_auto.MODEL_MAPPING_NAMES,
    AutoModelForCausalLM: modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    AutoModelForMaskedLM: modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    AutoModelForSequenceClassification: modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    AutoModelForTokenClassification: modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
}

# Tests that do not apply to this family, with the reason.
NOT_APPLICABLE = {
    "test_generation_tester_mixin_inheritance": "the source distribution has no GenerationTesterMixin (tests/generation "
    "is left out); tests/test_generation_modes.py and tests/test_contract.py are this family's generation suite",
}


def skipped(reason: str):
    def test(self):
        self.skipTest(reason)

    return test


def model_test_case(config_class: type, encoding: str, auto_classes=None, slow: bool = True) -> type[unittest.TestCase]:
    """ModelTesterMixin bound to the heads of `config_class`'s family (those of `auto_classes`, by default every one)
    with `encoding`; marked slow unless `slow=False`."""
    heads = {auto: model for auto, model in FAMILIES[config_class].items() if auto_classes is None or auto in auto_classes}

    def setUpClass(cls):  # noqa: N802 (unittest's names)
        cls.named = [mock.patch.dict(NAME_TABLES[auto], {config_class.model_type: model.__name__})
                     for auto, model in heads.items()]
        for patch in cls.named:
            patch.start()

    def tearDownClass(cls):  # noqa: N802
        for patch in cls.named:
            patch.stop()

    def setUp(self):  # noqa: N802
        self.model_tester = PosVarModelTester(self, config_class, encoding)

    not_applicable = dict(NOT_APPLICABLE)
    if POSITION_ENCODINGS[encoding].kind != "rotary":
        not_applicable.update(dict.fromkeys(
            [name for name in dir(common.ModelTesterMixin) if name.startswith("test_model_rope_scaling_from_config")],
            f"position_encoding={encoding!r} is not rotary, so rope_parameters (in every family's config) do not act",
        ))
    name = "".join(part.title() for part in f"{config_class.model_type}_{encoding}".split("_"))
    if auto_classes is not None:
        name += "".join(auto.__name__.removeprefix("AutoModel") or "Base" for auto in auto_classes)
    return type(
        f"Test{name}",
        (common.ModelTesterMixin, unittest.TestCase),
        {
            "all_model_classes": tuple(heads.values()),
            "pytestmark": [pytest.mark.contract, *([pytest.mark.slow] if slow else [])],
            "setUpClass": classmethod(setUpClass),
            "tearDownClass": classmethod(tearDownClass),
            "setUp": setUp,
            "__module__": __name__,
            **{test: skipped(reason) for test, reason in not_applicable.items()},
        },
    )


# `-m slow`: every model type with its default encoding and every bias encoding (CoPE's contextual one too) on the
# Llama family, each with all its heads. The default suite: the base model and causal LM with a learned bias (T5),
# whose gradient, checkpointing and folded-mask paths are the family's own (about a minute on two cores).
CASES = [(config_class, config_class().position_encoding) for config_class in FAMILIES]
CASES += [(PosVarLlamaConfig, name) for name in sorted(selectable_position_encodings())
          if POSITION_ENCODINGS[name].kind in ("bias", "contextual")]
TEST_CASES = [model_test_case(config_class, encoding) for config_class, encoding in CASES]
TEST_CASES.append(model_test_case(PosVarLlamaConfig, "t5_bias", (AutoModel, AutoModelForCausalLM), slow=False))
globals().update({case.__name__: case for case in TEST_CASES})
