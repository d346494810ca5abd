"""torch.export and ONNX export with dynamic batch and length, and loading with weights offloaded to disk."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILY_CONFIGS, VOCAB, build, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from hf_posvariants import PosVarDebertaConfig

EXPORT_CASES = [(encoding, backend) for encoding in ("rope", "alibi", "learned", "t5_bias") for backend in ("eager", "sdpa")]
# The case that once failed (a view of SDPA's non-contiguous output), and one bias encoding on eager, by default.
DEFAULT_EXPORTS = {("t5_bias", "sdpa"), ("alibi", "eager")}


class Logits(torch.nn.Module):
    """input_ids → logits, the signature an exported graph takes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def exportable(encoding: str, backend: str) -> Logits:
    config = tiny_config(FAMILY_CONFIGS[1], encoding, num_key_value_heads=4, use_cache=False)
    return Logits(build(AutoModelForCausalLM, config, backend))


def dynamic_shapes() -> dict:
    return {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("length", max=64)}}


@pytest.mark.parametrize(("encoding", "backend"), EXPORT_CASES, ids=[f"{e}-{b}" for e, b in EXPORT_CASES])
def test_torch_export_keeps_batch_and_length_dynamic(encoding, backend):
    model = exportable(encoding, backend)
    program = torch.export.export(model, (torch.randint(3, VOCAB, (2, 8)),), dynamic_shapes=dynamic_shapes())
    other = torch.randint(3, VOCAB, (3, 13))  # a shape the trace never saw
    torch.testing.assert_close(program.module()(other), model(other), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("encoding", "backend"),
    [pytest.param(e, b, marks=() if (e, b) in DEFAULT_EXPORTS else pytest.mark.slow) for e, b in EXPORT_CASES],
    ids=[f"{e}-{b}" for e, b in EXPORT_CASES],
)
def test_onnx_export_matches_onnxruntime(tmp_path, encoding, backend):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = exportable(encoding, backend)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.randint(3, VOCAB, (2, 8)),), path, dynamo=True, dynamic_shapes=dynamic_shapes())
    session = onnxruntime.InferenceSession(str(path))
    other = torch.randint(3, VOCAB, (3, 13))
    (logits,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), model(other).detach(), atol=1e-5, rtol=1e-5)


def deberta_config(**overrides) -> PosVarDebertaConfig:
    fields = dict(num_key_value_heads=4, position_encoding="nope", position_buckets=8, max_position_embeddings=32)
    fields.update(overrides)
    return tiny_config(PosVarDebertaConfig, **fields)


def test_deberta_runs_with_its_weights_offloaded_to_disk(tmp_path):
    # device_map="auto" with a tiny memory budget leaves weights on the meta device until accelerate's hooks load
    # them: the relative table must be read through its module (it was read as `.weight`).
    model = build(AutoModelForMaskedLM, deberta_config())
    model.save_pretrained(tmp_path / "model")
    offloaded = AutoModelForMaskedLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": 20_000}, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_enhanced_mask_decoder_refuses_inputs_beyond_its_position_table():
    model = build(AutoModelForMaskedLM, deberta_config(emd_layers=2))
    model(torch.randint(3, VOCAB, (1, 32)))  # the whole table is fine
    with pytest.raises(ValueError, match="max_position_embeddings=32.*emd_layers=0"):
        model(torch.randint(3, VOCAB, (1, 33)))
    encoder = build(AutoModelForMaskedLM, deberta_config(emd_layers=0))
    assert encoder(torch.randint(3, VOCAB, (1, 33))).logits.shape == (1, 33, VOCAB)  # relative positions only: no limit
