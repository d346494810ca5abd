"""Tensor and pipeline parallelism through transformers' own loader: `from_pretrained(..., tp_plan="auto")` under a
real two-process torchrun over gloo gives the one-process logits, greedy tokens and gradients for every configuration
whose heads split (a shared position bias read at each rank's heads), and every other configuration is refused before
a weight is loaded; two pipeline stages (`DistributedConfig(pp_size=2)`) give the one-process logits, and greedy tokens
and logits at every step with a dynamic or a static KV cache."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.distributed import DistributedConfig
from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

from hf_posvariants import FAMILIES
from hf_posvariants.configuration_posvariants import tensor_parallel_encodings
from hf_posvariants.modeling_posvariants import HeadShard
from hf_posvariants.position_encodings import POSITION_ENCODINGS, T5RelativeBias
from tests.conftest import ENCODINGS, TORCHRUN, build, family_with, tiny_config

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


# One rank of `torchrun --nproc_per_node 2`: loads every case with tp_plan="auto", records logits, greedy tokens and
# the whole gradient of every parameter (or the refusal) per case; then every case as two pipeline stages: logits, and
# greedy decoding with each cache implementation.
TP_WORKER = """
import json, os, sys, warnings
from pathlib import Path
import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig
import hf_posvariants  # noqa: F401
from tests.test_tensor_parallel import GREEDY, gradients

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
    tokens = model.generate(**inputs, **GREEDY).sequences
    grads = {name: grad.full_tensor() if isinstance(grad, DTensor) else grad for name, grad in gradients(model, inputs)}
    outputs = {"logits": logits, "tokens": tokens, "tp_size": model.tp_size, "gradients": grads}
    torch.save(outputs, folder / f"{case}.rank{rank}.pt")
(folder / f"refusals.rank{rank}.json").write_text(json.dumps(refusals))
for case in json.loads((folder / "cases.json").read_text()):  # two pipeline stages, a layer each
    model = AutoModelForCausalLM.from_pretrained(folder / case, distributed_config=DistributedConfig(pp_size=2))
    inputs = torch.load(folder / "inputs.pt")
    with torch.no_grad():
        outputs = {"logits": model(**inputs).logits}
    for cache in ("dynamic", "static"):
        generated = model.generate(**inputs, **GREEDY, cache_implementation=cache)
        outputs[cache] = (generated.sequences, torch.stack(generated.logits, dim=1))
    torch.save(outputs, folder / f"{case}.pipeline.rank{rank}.pt")
"""


# Greedy decoding as the tests compare it: the tokens and every step's logits.
GREEDY = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_logits": True,
          "return_dict_in_generate": True}  # fmt: skip


def run_worker(source: str, folder: Path, processes: int) -> None:
    """`source` as a script in `folder`, run by `torchrun --nproc_per_node processes` with `folder` as its argument and
    this checkout on the path; fails the test with its error output if a rank fails."""
    driver = folder / "worker.py"
    driver.write_text(source)
    result = subprocess.run(
        [*TORCHRUN, "--nproc_per_node", str(processes), str(driver), str(folder)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]


def gradients(model, inputs: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, gradient) of every parameter, accumulated over one backward of the causal-LM loss per row of `inputs`
    (padding ignored), as gradient accumulation does over micro-batches."""
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.zero_grad()
    for row in range(labels.shape[0]):
        micro_batch = {key: value[row : row + 1] for key, value in inputs.items()}
        model(**micro_batch, labels=labels[row : row + 1]).loss.backward()
    return [(name, parameter.grad) for name, parameter in model.named_parameters() if parameter.grad is not None]


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


# One torchrun launch of two fresh interpreters loading 46 models with tensor parallelism (a forward, a generation and
# two backwards each), then as two pipeline stages (a forward and two generations each): 108 s on 2 shared cores.
@pytest.mark.slow
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
        generated = reference.generate(**inputs, **GREEDY)
        tokens, step_logits = generated.sequences, torch.stack(generated.logits, dim=1)
        expected[name] = (logits, tokens, dict(gradients(reference, inputs)), step_logits)
        claims[name] = splits(config)
    (tmp_path / "cases.json").write_text(json.dumps(list(expected)))
    run_worker(TP_WORKER, tmp_path, TP_SIZE)
    for rank in range(TP_SIZE):
        refusals = json.loads((tmp_path / f"refusals.rank{rank}.json").read_text())
        assert sorted(refusals) == sorted(name for name, claimed in claims.items() if not claimed)
        assert all(message.startswith("Tensor parallelism (tp_size=2)") for message in refusals.values())
        for name in (name for name, claimed in claims.items() if claimed):
            outputs = torch.load(tmp_path / f"{name}.rank{rank}.pt")
            assert outputs["tp_size"] == TP_SIZE
            torch.testing.assert_close(outputs["logits"], expected[name][0], rtol=1e-5, atol=1e-5, msg=name)
            assert torch.equal(outputs["tokens"], expected[name][1]), name
            assert outputs["gradients"].keys() == expected[name][2].keys(), name
            for key, gradient in expected[name][2].items():
                got = outputs["gradients"][key]
                torch.testing.assert_close(got, gradient, rtol=1e-5, atol=1e-5, msg=f"{name} {key}")
        # Pipeline parallelism splits the layers, not the heads: every case takes it, with either cache.
        for name, (logits, tokens, _, step_logits) in expected.items():
            outputs = torch.load(tmp_path / f"{name}.pipeline.rank{rank}.pt")
            torch.testing.assert_close(outputs["logits"], logits, rtol=1e-5, atol=1e-5, msg=name)
            for cache in ("dynamic", "static"):
                assert torch.equal(outputs[cache][0], tokens), f"{name} {cache}"
                torch.testing.assert_close(outputs[cache][1], step_logits, rtol=1e-5, atol=1e-5, msg=f"{name} {cache}")
    # Every causal family × encoding splits, bias encodings included; only differential pairs across ranks do not.
    refused = [name for name, claimed in claims.items() if not claimed]
    assert refused == ["posvar_diff-halves", "posvar_diff-one-kv-pair"]


@pytest.mark.parametrize("config_class", list(FAMILIES), ids=lambda c: c.model_type)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_tensor_parallel_claims_follow_per_head_state(config_class, encoding):
    """Every encoding splits, a bias by its declared per-head tables; refused only where the attention projects
    relative embeddings per head (DeBERTa) or pairs heads across ranks (differential attention's "halves")."""
    kind = POSITION_ENCODINGS[encoding].kind
    if config_class.attention_variant == "disentangled" and kind not in ("absolute", "none"):
        pytest.skip("posvar_deberta takes only input encodings")
    pairs = {"num_key_value_heads": 4} if config_class.attention_variant == "differential" else {}
    config = tiny_config(config_class, encoding, **pairs)
    assert splits(config) == (config.attention_variant != "disentangled")
    if config.attention_variant == "differential":
        config.differential_head_layout = "halves"
        assert not splits(config)


class UndeclaredBias(T5RelativeBias):
    """A bias registered from outside the package that does not say which of its tables are per head."""

    name = "undeclared_bias"
    per_head_tables = None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"position_encoding": "undeclared_bias"}, r"position_encoding='undeclared_bias': its bias does not declare"),
        ({"layer_position_encodings": ["rope", "undeclared_bias"]}, r"layer_position_encodings='undeclared_bias'"),
        ({"attention_variant": "differential"}, r"num_key_value_heads=2 to be a multiple of 4 \(head pairs per rank\)"),
        ({"attention_variant": "differential", "num_key_value_heads": 4, "differential_head_layout": "halves"},
         r"differential_head_layout='halves'"),
        ({"num_key_value_heads": 1}, r"needs num_key_value_heads=1 to be a multiple of 2; choose a tp_size"),
    ],
)
def test_tensor_parallel_refused_at_distribution_before_loading(overrides, message, monkeypatch):
    """The hook transformers calls when it distributes a freshly built model refuses before any sharding."""
    monkeypatch.setitem(POSITION_ENCODINGS, UndeclaredBias.name, UndeclaredBias)
    assert UndeclaredBias.name not in tensor_parallel_encodings() and "t5_bias" in tensor_parallel_encodings()
    overrides = {"position_encoding": "rope", **overrides}
    config = tp_config(CAUSAL_FAMILIES[0], overrides.pop("position_encoding"), **overrides)
    model = build(AutoModelForCausalLM, config)
    with pytest.raises(ValueError, match=message):
        type(model).maybe_distribute_model(model, DistributedConfig(tp_size=TP_SIZE), mesh_manager=None)
    # Without tensor parallelism the same model passes through (FSDP alone has no per-head split).
    assert type(model).maybe_distribute_model(model, DistributedConfig(fsdp_size=TP_SIZE), mesh_manager=None) is model


BIAS_ENCODINGS = [name for name in ENCODINGS if POSITION_ENCODINGS[name].kind == "bias"]


@pytest.mark.parametrize("encoding", BIAS_ENCODINGS)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "flex_attention"])
def test_rank_heads_read_the_full_models_bias_at_those_heads(encoding, attn_implementation):
    """A base model told that it holds heads [2, 4) (as rank 1 of 2 does) gets the full model's bias of heads 2 and 3:
    folded into the mask (SDPA) or as flex's score function, where head h reads the model's head 2 + h. (FIRE's output
    layer over two heads sums in another order than over four: equal to float rounding.)"""
    model = perturbed(build(AutoModelForCausalLM, tp_config(CAUSAL_FAMILIES[0], encoding), attn_implementation))
    length = 7
    slots = torch.arange(length)
    inputs = (torch.zeros(2, length, 32), torch.stack([slots, slots + 3]), slots, slots, None)  # two rows of positions
    with torch.no_grad():
        full, full_mask = model.model.compute_positions(*inputs)
        model.model.head_shard = HeadShard(slice(2, 4))
        rank, rank_mask = model.model.compute_positions(*inputs)
    if attn_implementation == "sdpa" and rank.route.columns:  # causal ALiBi rides in a query and a key column
        torch.testing.assert_close(rank.bias.columns().per_head, full.bias.columns().per_head[2:4], rtol=0, atol=0)
        torch.testing.assert_close(rank.bias.columns().per_key, full.bias.columns().per_key, rtol=0, atol=0)
        torch.testing.assert_close(rank.bias.materialise(), full.bias.materialise()[:, 2:4], rtol=1e-6, atol=1e-6)
        return
    if attn_implementation == "sdpa":
        assert rank.route.folded and rank_mask.shape[1] == 2
        torch.testing.assert_close(rank_mask, full_mask[:, 2:4], rtol=1e-6, atol=1e-6)
        return
    grid = (torch.zeros(()), torch.arange(2)[:, None, None, None], torch.arange(2)[None, :, None, None],
            slots[None, None, :, None], slots[None, None, None, :])  # fmt: skip
    expected = full.bias.score_mod()(grid[0], grid[1], grid[2] + 2, *grid[3:])
    torch.testing.assert_close(rank.bias.score_mod()(*grid), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rank.bias.materialise(), full.bias.materialise()[:, 2:4], rtol=1e-6, atol=1e-6)


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


def test_a_pipeline_stage_skips_the_layers_it_does_not_hold():
    """transformers' pipeline split puts `PipelineIdentityLayer` where a layer belongs to another stage: the stage runs
    its own layers (with a bias chosen for them alone) and passes the others through, as a model of those layers does."""
    config = tp_config(CAUSAL_FAMILIES[1], "t5_bias")
    stage = perturbed(build(AutoModelForCausalLM, config, attn_implementation="sdpa")).model
    stage.layers[1] = PipelineIdentityLayer()
    alone = build(AutoModelForCausalLM, tp_config(CAUSAL_FAMILIES[1], "t5_bias", num_hidden_layers=1), "sdpa").model
    alone.load_state_dict(stage.state_dict())
    input_ids = torch.tensor([[5, 9, 14, 3, 22, 7, 30]])
    with torch.no_grad():
        expected = alone(input_ids).last_hidden_state
        torch.testing.assert_close(stage(input_ids).last_hidden_state, expected, rtol=0, atol=0)


def pipeline_stages(model) -> list:
    """The two stages transformers' pipeline split (`apply_pipeline_parallelism`) makes of a two-layer causal LM, in
    one process: the first holds the embeddings and layer 0 and hands on its hidden states, the second holds layer 1,
    the final norm and the head (and the embeddings only where the head is tied to them)."""
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    first.model.layers[1] = first.model.norm = first.lm_head = PipelineIdentityLayer()
    second.model.layers[0] = PipelineIdentityLayer()
    if not model.config.tie_word_embeddings:
        second.model.embed_tokens = PipelineIdentityLayer()
    return [first, second]


def greedy_through_stages(stages: list, inputs: dict, cache_class: type, steps: int = 4):
    """Greedy tokens and every step's logits, the loop of generate() with each stage as one rank of a pipeline runs
    it: its own cache and generate()'s inputs for it (`prepare_inputs_for_generation`, which builds the mask ahead for
    a static cache); the first stage reads the token ids, each later one the hidden states handed on; the last gives
    the logits. A single stage is the whole model."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    size = {"max_cache_len": ids.shape[1] + steps} if cache_class is StaticCache else {}
    caches = [cache_class(config=stage.config, **size) for stage in stages]
    step_logits = []
    for step in range(steps):
        hidden = None
        for stage, cache in zip(stages, caches):
            stage_inputs = stage.prepare_inputs_for_generation(
                ids, next_sequence_length=1 if step else None, cache=cache, attention_mask=mask,
                position_ids=position_ids, use_cache=True, is_first_iteration=not step,
            )  # fmt: skip
            if hidden is not None:
                stage_inputs["inputs_embeds"] = hidden
                del stage_inputs["input_ids"]
            if stage is stages[-1]:
                step_logits.append(stage(**stage_inputs).logits[:, -1])
            else:
                hidden = stage.model(**stage_inputs).last_hidden_state
        ids = torch.cat([ids, step_logits[-1].argmax(-1, keepdim=True)], dim=-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + 1], dim=-1)
    return ids, torch.stack(step_logits, dim=1)


@pytest.mark.parametrize("cache_class", [DynamicCache, StaticCache], ids=lambda c: c.__name__)
@pytest.mark.parametrize("encoding", ["t5_bias", "alibi", "rope", "cope"])
@pytest.mark.parametrize("config_class", CAUSAL_FAMILIES, ids=lambda c: c.model_type)
def test_pipeline_stages_generate_the_one_process_tokens(config_class, encoding, cache_class):
    """Greedy decoding with a KV cache through two pipeline stages gives one process's logits at every step: the
    second stage, which never writes layer 0's cache, sizes its mask, query slots and bias from its own layer's.
    The one-stage loop is checked against generate() itself, so the loop is generate()'s."""
    model = perturbed(build(AutoModelForCausalLM, tiny_config(config_class, encoding), attn_implementation="sdpa"))
    inputs = {
        "input_ids": torch.tensor([[5, 9, 14, 3, 22, 7, 30], [0, 0, 11, 4, 19, 8, 6]]),
        "attention_mask": torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]]),
    }
    with torch.no_grad():
        tokens, logits = greedy_through_stages([model], inputs, cache_class)
        cache_implementation = "static" if cache_class is StaticCache else "dynamic"
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                   cache_implementation=cache_implementation)  # fmt: skip
        assert torch.equal(tokens, generated)
        staged_tokens, staged_logits = greedy_through_stages(pipeline_stages(model), inputs, cache_class)
    torch.testing.assert_close(staged_logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(staged_tokens, tokens)


def test_tied_heads_are_sharded_with_their_embedding():
    """A tied head is the embedding's parameter, so every head's plan shards both or neither (transformers' own
    `test_tied_weights_are_sharded_together`, here for every head without the slow upstream grid)."""
    for config_class, heads in FAMILIES.items():
        for auto_class in heads:
            model = build(auto_class, tp_config(config_class, "nope"))
            if "lm_head.weight" in (model._tied_weights_keys or {}):
                assert ("lm_head" in model.tp_plan) == ("model.embed_tokens" in model.tp_plan), type(model).__name__
