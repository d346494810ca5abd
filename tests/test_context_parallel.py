"""Context parallelism: the sequence split over ranks by torch's `context_parallel` (what accelerate's `cp_size` runs),
the ring attention intercepting SDPA's causal kernel. Every configuration that claims it gives one process's logits
and gradients in a real two-process torchrun over gloo (torch's ring algorithm on the CPU kernel,
`tests/cpu_ring_attention.py`); every other one is refused by name before any compute."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from accelerate.big_modeling import _attach_context_parallel_hooks
from accelerate.parallelism_config import ParallelismConfig
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import context_parallel
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, TrainingArguments

from hf_posvariants import FAMILIES
from hf_posvariants.position_encodings import position_ids_encodings
from hf_posvariants.training import pipeline
from hf_posvariants.training.context_parallel import check_context_parallel_request, requested_cp_size
from tests import cpu_ring_attention
from tests.conftest import ENCODINGS, build, family_with, tiny_config
from tests.test_tensor_parallel import CAUSAL_FAMILIES, perturbed, run_worker
from tests.test_training import tiny_argv

CP_SIZE = 2
# What the README promises: the encodings read from `position_ids` alone.
SPLITTING = ["binary", "index", "learned", "nope", "rope", "sinusoidal", "xpos"]

# One rank of `torchrun --nproc_per_node 2`: every case under torch's `context_parallel` with the batch split as
# transformers' Trainer splits it (input_ids, attention_mask, position_ids, shift_labels on dimension 1, load-balanced),
# the loss normalised by the whole batch's token count as the Trainer does; logits gathered back into order, gradients
# summed over the ranks.
CP_WORKER = """
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import context_parallel
from torch.distributed.tensor.experimental._attention import context_parallel_unshard, set_rotate_method
from transformers import AutoModelForCausalLM
import hf_posvariants  # noqa: F401
from tests import cpu_ring_attention
from tests.test_context_parallel import loss_and_logits

cpu_ring_attention.install()
torch.set_num_threads(1)
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
folder, rank = Path(sys.argv[1]), dist.get_rank()
inputs = torch.load(folder / "inputs.pt")
for case, settings in json.loads((folder / "cases.json").read_text()).items():
    model = AutoModelForCausalLM.from_pretrained(folder / settings["folder"])
    model.check_context_parallel(mesh.size())
    for layer in model.model.layers if settings["kernel_calls"] else []:
        layer.self_attn.kernel_calls = settings["kernel_calls"]
    set_rotate_method(settings["rotate"])
    shards = {name: tensor.clone() for name, tensor in inputs.items() if name != "num_items_in_batch"}
    with context_parallel(mesh, buffers=list(shards.values()), buffer_seq_dims=[1] * len(shards),
                          no_restore_buffers=set(shards.values())):
        loss, logits = loss_and_logits(model, {**shards, "num_items_in_batch": inputs["num_items_in_batch"]})
        loss.backward()
    logits, = context_parallel_unshard(mesh, [logits.detach()], [1])
    gradients = {}
    for name, parameter in model.named_parameters():
        dist.all_reduce(parameter.grad)
        gradients[name] = parameter.grad
    torch.save({"logits": logits, "gradients": gradients}, folder / f"{case}.rank{rank}.pt")
set_rotate_method("allgather")
dist.destroy_process_group()
"""


def loss_and_logits(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal-LM loss of `inputs` (their `shift_labels`, summed over this piece of the batch and divided by
    `num_items_in_batch`) and the logits."""
    outputs = model(**inputs)
    return outputs.loss, outputs.logits


def batch(length: int = 16) -> dict:
    """A batch as the Trainer hands it to a context-parallel model: next-token labels shifted before the split, so the
    last token of one rank's piece is scored against the first of the next; position ids spelled out."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 60, (2, length), generator=generator)
    shift_labels = torch.nn.functional.pad(input_ids, (0, 1), value=-100)[:, 1:].contiguous()
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "position_ids": torch.arange(length).expand(2, length).contiguous(),
        "shift_labels": shift_labels,
        "labels": input_ids.clone(),
        "num_items_in_batch": (shift_labels != -100).sum(),
    }


def cases():
    """(name, config, differential kernel path, rotate method) of every claimed configuration: each causal family with
    each splitting encoding, a per-layer schedule, differential attention on the kernel paths that call SDPA (those of
    GPUs; on CPU it computes its maps itself), and torch's other KV rotation."""
    for config_class in CAUSAL_FAMILIES:
        differential = config_class.attention_variant == "differential"
        for encoding in position_ids_encodings():
            yield f"{config_class.model_type}-{encoding}", tiny_config(config_class, encoding), \
                "two_calls" if differential else None, "allgather"
    differential = family_with(attention_variant="differential")
    yield "posvar_diff-rope-padded_call", tiny_config(differential, "rope"), "padded_call", "allgather"
    llama = family_with(mlp_type="gated", attention_variant="standard")
    yield "posvar_llama-schedule-rope-nope", tiny_config(llama, "rope", layer_position_encodings=["rope", "nope"]), \
        None, "allgather"
    yield "posvar_llama-rope-alltoall", tiny_config(llama, "rope"), None, "alltoall"


# One torchrun launch of two fresh interpreters loading 26 tiny models, a forward and a backward each under the ring:
# ~40 s on 2 busy cores.
@pytest.mark.slow
def test_context_parallel_matches_one_process(tmp_path):
    inputs = batch()
    torch.save(inputs, tmp_path / "inputs.pt")
    expected, settings = {}, {}
    for name, config, kernel_calls, rotate in cases():
        model = perturbed(build(AutoModelForCausalLM, config, attn_implementation="sdpa"))
        model.save_pretrained(tmp_path / name)
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / name)  # one process, as a user loads it
        for layer in reference.model.layers if kernel_calls else []:
            layer.self_attn.kernel_calls = kernel_calls
        loss, logits = loss_and_logits(reference, inputs)
        loss.backward()
        gradients = {key: parameter.grad for key, parameter in reference.named_parameters()}
        expected[name] = (logits.detach(), gradients)
        settings[name] = {"folder": name, "kernel_calls": kernel_calls, "rotate": rotate}
    (tmp_path / "cases.json").write_text(json.dumps(settings))
    run_worker(CP_WORKER, tmp_path, CP_SIZE)
    for rank in range(CP_SIZE):
        for name, (logits, gradients) in expected.items():
            outputs = torch.load(tmp_path / f"{name}.rank{rank}.pt")
            torch.testing.assert_close(outputs["logits"], logits, rtol=1e-5, atol=1e-5, msg=name)
            assert outputs["gradients"].keys() == gradients.keys(), name
            for key, gradient in gradients.items():
                torch.testing.assert_close(outputs["gradients"][key], gradient, rtol=1e-5, atol=1e-5,
                                           msg=f"{name} {key}")  # fmt: skip


def test_the_splitting_encodings_are_those_read_from_position_ids():
    assert position_ids_encodings() == SPLITTING


@pytest.mark.parametrize("config_class", CAUSAL_FAMILIES, ids=lambda c: c.model_type)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_causal_models_claim_context_parallelism_for_position_id_encodings_only(config_class, encoding):
    model = build(AutoModelForCausalLM, tiny_config(config_class, encoding), attn_implementation="sdpa")
    assert model.supports_context_parallel == (encoding in SPLITTING)
    if encoding in SPLITTING:
        model.check_context_parallel(CP_SIZE)
        _attach_context_parallel_hooks(model)  # what accelerate does to a model it prepares for cp_size > 1
        return
    with pytest.raises(ValueError, match=rf"Context parallelism \(cp_size=2\) is not supported for "
                                         rf"position_encoding='{encoding}' .*allowed encodings are \['binary'"):
        model.check_context_parallel(CP_SIZE)
    with pytest.raises(ValueError, match="does not support context parallelism"):
        _attach_context_parallel_hooks(model)


@pytest.mark.parametrize(
    ("head", "model_type", "overrides", "backend", "message"),
    [
        (AutoModelForCausalLM, "posvar_llama", {}, "eager", r"attn_implementation='eager'.*values are \['sdpa'\]"),
        (AutoModelForCausalLM, "posvar_llama", {}, "flex_attention", r"attn_implementation='flex_attention'"),
        (AutoModelForMaskedLM, "posvar_llama", {}, "sdpa", r"attends bidirectionally"),
        (AutoModelForMaskedLM, "posvar_deberta", {}, "sdpa", r"attends bidirectionally"),
        (AutoModelForCausalLM, "posvar_llama", {"layer_position_encodings": ["rope", "alibi"]}, "sdpa",
         r"layer_position_encodings='alibi' \(bias\)"),
    ],
)
def test_context_parallelism_refused_by_name(head, model_type, overrides, backend, message):
    config_class = next(config_class for config_class in FAMILIES if config_class.model_type == model_type)
    model = build(head, tiny_config(config_class, "rope" if model_type != "posvar_deberta" else "nope", **overrides),
                  attn_implementation=backend)  # fmt: skip
    assert not model.supports_context_parallel
    with pytest.raises(ValueError, match=message):
        model.check_context_parallel(CP_SIZE)


def test_deberta_attention_refused_even_when_causal():
    deberta = next(config_class for config_class in FAMILIES if config_class.model_type == "posvar_deberta")
    with pytest.raises(ValueError, match=r"attention_variant='disentangled'; allowed values are \['standard', "):
        tiny_config(deberta, "nope").check_context_parallel(CP_SIZE, is_causal=True, attn_implementation="sdpa")


def test_a_training_run_reads_cp_size_as_accelerate_does(monkeypatch):
    """From the TrainingArguments' ParallelismConfig, else from what `accelerate launch --parallelism_config_cp_size`
    exports; a request for a model that cannot split is refused before the data is prepared."""
    plain = TrainingArguments(output_dir="unused", use_cpu=True)
    assert requested_cp_size(plain) == 1
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    assert requested_cp_size(plain) == 2
    assert requested_cp_size(TrainingArguments(output_dir="unused", use_cpu=True,
                                               parallelism_config=ParallelismConfig(cp_size=4))) == 4  # fmt: skip
    llama = family_with(mlp_type="gated", attention_variant="standard")
    check_context_parallel_request(tiny_config(llama, "rope"), True, "sdpa", plain)
    with pytest.raises(ValueError, match=r"cp_size=2\) is not supported for position_encoding='t5_bias'"):
        check_context_parallel_request(tiny_config(llama, "t5_bias"), True, "sdpa", plain)
    with pytest.raises(ValueError, match=r"cp_size=2\) runs causal attention only"):
        check_context_parallel_request(tiny_config(llama, "rope"), False, "sdpa", plain)
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "1")
    check_context_parallel_request(tiny_config(llama, "t5_bias"), True, "sdpa", plain)


def test_train_py_refuses_before_preparing_the_data(tmp_path, monkeypatch):
    """`accelerate launch --parallelism_config_cp_size 2` exports these; the run stops before packing blocks."""
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    monkeypatch.setattr(pipeline, "task_inputs", lambda *args: pytest.fail("the data was prepared"))
    with pytest.raises(ValueError, match=r"cp_size=2\) is not supported for position_encoding='alibi'"):
        pipeline.main(tiny_argv(tmp_path, "clm", "posvar_llama", "--model.position_encoding", "alibi"))


@pytest.fixture
def one_rank_mesh():
    """A one-process gloo group and its mesh: torch's context parallel runs (its dispatcher, its sharding) as on many
    ranks, in this process; the group is destroyed after, so later tests see no distributed run."""
    cpu_ring_attention.install()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_context_parallelism_without_position_ids_is_refused(one_rank_mesh):
    """Under `context_parallel` every rank would number its piece of the sequence from 0: the model refuses to guess
    positions there, and computes as usual with them given, or outside the context."""
    llama = family_with(mlp_type="gated", attention_variant="standard")
    model = build(AutoModelForCausalLM, tiny_config(llama, "rope"), attn_implementation="sdpa")
    inputs = {name: tensor.clone() for name, tensor in batch().items() if name in ("input_ids", "position_ids")}
    expected = model(**inputs).logits
    with context_parallel(one_rank_mesh, buffers=list(inputs.values()), buffer_seq_dims=[1] * len(inputs)):
        with pytest.raises(ValueError, match=r"position_ids is required under context parallelism .* start at 0 on "
                                             r"every rank"):  # fmt: skip
            model(input_ids=inputs["input_ids"])
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(model(input_ids=inputs["input_ids"]).logits, expected)
