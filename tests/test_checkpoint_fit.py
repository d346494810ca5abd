"""A checkpoint whose config.json no longer describes its weights is an error on from_pretrained, not a load
report: base-model weights missing or unused, all of them where a config field decides them, name that field.
Task-head weights may still be missing (a base checkpoint fine-tuned as a classifier) or unused (an MLM checkpoint
loaded bare), and weights that fit no value of the deciding fields load with the keys reported, as in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from conftest import FAMILY_CONFIGS, build, tiny_config
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from hf_posvariants import PosVarDebertaConfig, PosVarLlamaConfig

IDS = [config_class.model_type for config_class in FAMILY_CONFIGS]
pytestmark = pytest.mark.contract


def save(model, folder, **edits):
    """save_pretrained, then edit config.json by hand as a user would."""
    model.save_pretrained(folder)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edits}))
    return folder


@pytest.mark.parametrize("config_class", FAMILY_CONFIGS, ids=IDS)
@pytest.mark.parametrize(
    "saved,edited,kind",
    [("learned", "sinusoidal", "unused"), ("sinusoidal", "t5_bias", "missing")],
)
def test_edited_position_encoding_is_refused(config_class, saved, edited, kind, tmp_path):
    folder = save(build(AutoModelForMaskedLM, tiny_config(config_class, saved)), tmp_path, position_encoding=edited)
    for auto_class in (AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification):
        with pytest.raises(ValueError, match=rf"{kind} \['(model\.)?position_encoding\..*position_encoding='{edited}'"):
            auto_class.from_pretrained(folder)


@pytest.mark.parametrize("saved,edited", [("differential", "standard"), ("standard", "differential")])
def test_edited_attention_variant_is_refused(saved, edited, tmp_path):
    model = build(AutoModelForMaskedLM, tiny_config(PosVarLlamaConfig, "rope", attention_variant=saved))
    folder = save(model, tmp_path, attention_variant=edited)
    with pytest.raises(ValueError, match=rf"self_attn\.lambda_q1.*attention_variant='{edited}'.*ignore_architecture"):
        AutoModelForMaskedLM.from_pretrained(folder)


def test_edited_deberta_relative_attention_is_refused(tmp_path):
    config = tiny_config(PosVarDebertaConfig, "nope", num_key_value_heads=4, position_buckets=8)
    folder = save(build(AutoModelForMaskedLM, config), tmp_path, relative_attention=False)
    with pytest.raises(ValueError, match=r"unused \['model\.relative_positions\.embeddings\.weight'.*relative_attention=False"):
        AutoModelForSequenceClassification.from_pretrained(folder)


def test_the_mismatch_loads_when_asked_and_reports_it(tmp_path):
    folder = save(build(AutoModel, tiny_config(PosVarLlamaConfig, "learned")), tmp_path, position_encoding="sinusoidal")
    model, info = AutoModel.from_pretrained(folder, ignore_architecture_mismatch=True, output_loading_info=True)
    assert info["unexpected_keys"] == {"position_encoding.embeddings.weight"}
    assert model.config.position_encoding == "sinusoidal"


@pytest.mark.parametrize("config_class", [*FAMILY_CONFIGS, PosVarDebertaConfig], ids=[*IDS, "posvar_deberta"])
def test_task_heads_still_load_from_other_checkpoints(config_class, tmp_path):
    """Base → classifier (head weights missing) and MLM → base or classifier (head weights unused) keep working."""
    fields = dict(num_key_value_heads=4, position_buckets=8) if config_class is PosVarDebertaConfig else {}
    config = tiny_config(config_class, "learned" if config_class is not PosVarDebertaConfig else "nope", **fields)
    base, masked = build(AutoModel, config), build(AutoModelForMaskedLM, config)
    base.save_pretrained(tmp_path / "base")
    masked.save_pretrained(tmp_path / "masked")
    classifier, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == {"score.weight", "score.bias"}
    torch.testing.assert_close(classifier.model.embed_tokens.weight, base.embed_tokens.weight)
    AutoModel.from_pretrained(tmp_path / "masked")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "masked")


def test_a_checkpoint_with_no_fitting_weights_loads_with_the_missing_keys_reported(tmp_path):
    """No value of a deciding field explains weights that are all missing: transformers' report, not the edit error."""
    model = build(AutoModel, tiny_config(PosVarLlamaConfig, "t5_bias"))
    model.save_pretrained(tmp_path)
    save_file({"unrelated.weight": torch.zeros(3)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set(model.state_dict()) and info["unexpected_keys"] == {"unrelated.weight"}
    assert isinstance(loaded, type(model))
