"""Tensor and pipeline parallelism through transformers' own loader: `from_pretrained(..., tp_plan="auto")` under a
real two-process torchrun over gloo gives the one-process logits and greedy tokens for every configuration whose
heads split, and every other configuration is refused before a weight is loaded; two pipeline stages
(`DistributedConfig(pp_size=2)`) give the one-process logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from hf_posvariants import FAMILIES
from hf_posvariants.configuration_posvariants import TENSOR_PARALLEL_UNSPLITTABLE_KINDS
from hf_posvariants.position_encodings import POSITION_ENCODINGS
from tests.conftest import ENCODINGS, build, family_with, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TP_SIZE = 2
CAUSAL_FAMILIES = [config_class for config_class, heads in FAMILIES.items() if AutoModelForCausalLM in heads]


def splits(config) -> bool:
    try:
        config.check_tensor_parallel(TP_SIZE)
    except ValueError:
        return False
    return True


def tp_config(config_class, encoding: str, **overrides):
    # An even vocabulary: the embedding and the head are split on it.
    return tiny_config(config_class, encoding, vocab_size=64, **overrides)


# One rank of `torchrun --nproc_per_node 2`: loads every case with tp_plan="auto", records logits and greedy tokens
# (or the refusal) per case; then the pipeline cases as two stages.
TP_WORKER = """
import json, os, sys, warnings
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig
import hf_posvariants  # noqa: F401

warnings.simplefilter("ignore", FutureWarning)  # tp_plan= is the documented spelling; DistributedConfig is the new one
torch.set_num_threads(1)
folder, rank = Path(sys.argv[1]), int(os.environ["RANK"])
refusals = {}
for case in json.loads((folder / "cases.json").read_text()):
    try:
        model = AutoModelForCausalLM.from_pretrained(folder / case, tp_plan="auto")
    except ValueError as error:
        refusals[case] = str(error)
        continue
    inputs = torch.load(folder / "inputs.pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.save({"logits": logits, "tokens": tokens, "tp_size": model.tp_size}, folder / f"{case}.rank{rank}.pt")
(folder / f"refusals.rank{rank}.json").write_text(json.dumps(refusals))
for case in json.loads((folder / "pipeline_cases.json").read_text()):  # two pipeline stages, a layer each
    model = AutoModelForCausalLM.from_pretrained(folder / case, distributed_config=DistributedConfig(pp_size=2))
    inputs = torch.load(folder / "inputs.pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"logits": logits}, folder / f"{case}.pipeline.rank{rank}.pt")
"""


def perturbed(model):
    """Weights away from their initial values (CoPE's embeddings and the norms start at constants)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def cases():
    """(name, config) for every causal family × encoding, GQA and tied or untied heads as the families have them;
    plus per-layer schedules, one with a bias entry."""
    for config_class in CAUSAL_FAMILIES:
        # Differential attention keeps head pairs on one rank: 4 key/value heads, a pair per rank.
        pairs = {"num_key_value_heads": 4} if config_class.attention_variant == "differential" else {}
        for encoding in ENCODINGS:
            yield f"{config_class.model_type}-{encoding}", tp_config(config_class, encoding, **pairs)
    llama = family_with(mlp_type="gated", attention_variant="standard")
    yield "posvar_llama-schedule-rope-nope", tp_config(llama, "rope", layer_position_encodings=["rope", "nope"])
    yield "posvar_llama-schedule-rope-alibi", tp_config(llama, "rope", layer_position_encodings=["rope", "alibi"])
    differential = family_with(attention_variant="differential")
    halves = {"num_key_value_heads": 4, "differential_head_layout": "halves"}
    yield "posvar_diff-halves", tp_config(differential, "rope", **halves)
    yield "posvar_diff-one-kv-pair", tp_config(differential, "rope")


# Pipeline parallelism splits the layers, not the heads: every encoding may take it. These cover tied embeddings
# scaled at the input, a bias, absolute and contextual positions, and differential attention. Forward passes only:
# with a KV cache a later stage holds no layer 0, whose cache length the masks and bias offsets read (greedy tokens
# of t5_bias differed).
PIPELINE_CASES = ["posvar_transformer-alibi", "posvar_transformer-learned", "posvar_llama-t5_bias",
                  "posvar_llama-cope", "posvar_diff-rope"]  # fmt: skip


@pytest.mark.slow  # one torchrun launch of two fresh interpreters loading ~40 models: about a minute on 2 busy cores
def test_tensor_parallel_matches_one_process_or_refuses(tmp_path):
    inputs = {
        "input_ids": torch.tensor([[5, 9, 14, 3, 22, 7, 30], [0, 0, 11, 4, 19, 8, 6]]),
        "attention_mask": torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]]),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    expected, claims = {}, {}
    for name, config in cases():
        model = perturbed(build(AutoModelForCausalLM, config, attn_implementation="sdpa"))
        model.save_pretrained(tmp_path / name)
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / name)  # one process, as a user loads it
        with torch.no_grad():
            logits = reference(**inputs).logits
        tokens = reference.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        expected[name], claims[name] = (logits, tokens), splits(config)
    (tmp_path / "cases.json").write_text(json.dumps(list(expected)))
    (tmp_path / "pipeline_cases.json").write_text(json.dumps(PIPELINE_CASES))
    driver = tmp_path / "tp_worker.py"
    driver.write_text(TP_WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(TP_SIZE), str(driver), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(TP_SIZE):
        refusals = json.loads((tmp_path / f"refusals.rank{rank}.json").read_text())
        assert sorted(refusals) == sorted(name for name, claimed in claims.items() if not claimed)
        assert all(message.startswith("Tensor parallelism (tp_size=2)") for message in refusals.values())
        for name in (name for name, claimed in claims.items() if claimed):
            outputs = torch.load(tmp_path / f"{name}.rank{rank}.pt")
            assert outputs["tp_size"] == TP_SIZE
            torch.testing.assert_close(outputs["logits"], expected[name][0], rtol=1e-5, atol=1e-5, msg=name)
            assert torch.equal(outputs["tokens"], expected[name][1]), name
        for name in PIPELINE_CASES:
            outputs = torch.load(tmp_path / f"{name}.pipeline.rank{rank}.pt")
            torch.testing.assert_close(outputs["logits"], expected[name][0], rtol=1e-5, atol=1e-5, msg=name)
    assert sum(claims.values()) >= 18  # both plain families × every encoding without per-head tables, and a schedule


@pytest.mark.parametrize("config_class", list(FAMILIES), ids=lambda c: c.model_type)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_tensor_parallel_claims_follow_per_head_state(config_class, encoding):
    """Refused exactly where the model holds one entry per head outside the split projections (a bias encoding's
    tables, DeBERTa's relative projections) or pairs heads across ranks (differential attention's "halves")."""
    kind = POSITION_ENCODINGS[encoding].kind
    if config_class.attention_variant == "disentangled" and kind not in ("absolute", "none"):
        pytest.skip("posvar_deberta takes only input encodings")
    pairs = {"num_key_value_heads": 4} if config_class.attention_variant == "differential" else {}
    config = tiny_config(config_class, encoding, **pairs)
    per_head = kind in TENSOR_PARALLEL_UNSPLITTABLE_KINDS
    assert splits(config) == (config.attention_variant != "disentangled" and not per_head)
    if config.attention_variant == "differential":
        config.differential_head_layout = "halves"
        assert not splits(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"position_encoding": "alibi"}, r"position_encoding='alibi': its bias"),
        ({"layer_position_encodings": ["rope", "t5_bias"]}, r"layer_position_encodings='t5_bias'"),
        ({"attention_variant": "differential"}, r"num_key_value_heads=2 to be a multiple of 4 \(head pairs per rank\)"),
        ({"attention_variant": "differential", "num_key_value_heads": 4, "differential_head_layout": "halves"},
         r"differential_head_layout='halves'"),
        ({"num_key_value_heads": 1}, r"needs num_key_value_heads=1 to be a multiple of 2; choose a tp_size"),
    ],
)
def test_tensor_parallel_refused_at_distribution_before_loading(overrides, message):
    """The hook transformers calls when it distributes a freshly built model refuses before any sharding."""
    overrides = {"position_encoding": "rope", **overrides}
    config = tp_config(CAUSAL_FAMILIES[0], overrides.pop("position_encoding"), **overrides)
    model = build(AutoModelForCausalLM, config)
    with pytest.raises(ValueError, match=message):
        type(model).maybe_distribute_model(model, DistributedConfig(tp_size=TP_SIZE), mesh_manager=None)
    # Without tensor parallelism the same model passes through (FSDP alone has no per-head split).
    assert type(model).maybe_distribute_model(model, DistributedConfig(fsdp_size=TP_SIZE), mesh_manager=None) is model


def test_plans_name_existing_modules():
    """Every rule of the plans names a module of each family (the gate projection only where the MLP is gated)."""
    for config_class in CAUSAL_FAMILIES:
        model = build(AutoModelForCausalLM, tp_config(config_class, "rope"))
        names = {name.replace(".0.", ".*.").replace(".1.", ".*.") for name, _ in model.named_modules()}
        plan = model.tp_plan
        assert plan["lm_head"] == "colwise_gather_output"
        assert {rule for rule in plan if rule not in names} == set()
        assert ("model.layers.*.mlp.gate_proj" in plan) == (config_class().mlp_type == "gated")
        assert set(model.pp_plan) == {"model.embed_tokens", "model.layers", "model.norm", "lm_head"}


def test_tied_heads_are_sharded_with_their_embedding():
    """A tied head is the embedding's parameter, so every head's plan shards both or neither (transformers' own
    `test_tied_weights_are_sharded_together`, here for every head without the slow upstream grid)."""
    for config_class, heads in FAMILIES.items():
        for auto_class in heads:
            model = build(auto_class, tp_config(config_class, "nope"))
            if "lm_head.weight" in (model._tied_weights_keys or {}):
                assert ("lm_head" in model.tp_plan) == ("model.embed_tokens" in model.tp_plan), type(model).__name__
