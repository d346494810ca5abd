"""torch.compile: our models trace into one graph (no graph breaks), and the Trainer's `torch_compile` flag
trains the same run as eager."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODINGS, VOCAB, build, tiny_config
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, CompileConfig, Trainer, TrainingArguments

from hf_posvariants import PosVarDiffConfig, PosVarLlamaConfig, PosVarTransformerConfig
from hf_posvariants.position_encodings import POSITION_ENCODINGS


def padded_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: a materialised mask, and the bias folded into it
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize(
    "config_class,encoding,backend,lm_loss",
    [
        (PosVarLlamaConfig, "rope", "sdpa", "plain"),
        (PosVarLlamaConfig, "alibi", "sdpa", "chunked"),
        (PosVarTransformerConfig, "t5_bias", "eager", "plain"),
        (PosVarTransformerConfig, "sinusoidal", "sdpa", "plain"),
        (PosVarDiffConfig, "rope", "sdpa", "chunked"),
        (PosVarDiffConfig, "alibi", "eager", "plain"),
    ],
)
def test_training_forward_has_no_graph_breaks(config_class, encoding, backend, lm_loss):
    model = build(AutoModelForCausalLM, tiny_config(config_class, encoding), backend).train()
    model.use_lm_loss(lm_loss)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**padded_inputs())
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    "config_class,encoding",
    [(PosVarLlamaConfig, name) for name in ENCODINGS if POSITION_ENCODINGS[name].cacheable]
    + [(PosVarDiffConfig, "rope"), (PosVarDiffConfig, "alibi")],
)
def test_static_cache_generation_compiles_in_one_graph_and_decodes_as_eager(config_class, encoding):
    """generate()'s compiled decoding step (what it does by itself on a GPU with a static cache) traces without a
    graph break for every cacheable encoding, and gives eager's tokens. The "eager" compiler backend keeps the
    test to dynamo's tracing (inductor's code generation is what the GPU benchmark measures)."""
    model = build(AutoModelForCausalLM, tiny_config(config_class, encoding, eos_token_id=None), "sdpa")
    inputs = padded_inputs()  # left padding: the bias and the mask over the whole static buffer
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=5, do_sample=False,
                  pad_token_id=0, cache_implementation="static")
    expected = model.generate(**kwargs, disable_compile=True)
    torch._dynamo.reset()
    counters.clear()
    compile_config = CompileConfig(backend="eager", mode=None, fullgraph=True)
    compile_config._compile_all_devices = True  # generate() compiles by itself only on accelerators
    generated = model.generate(**kwargs, compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, count: int, length: int):
        self.ids = torch.randint(3, VOCAB, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def train_with(tmp_path, config, **arguments) -> tuple[list[float], torch.nn.Module]:
    model = build(AutoModelForCausalLM, config, "sdpa").train()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, optim="sgd",
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **arguments,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(12, 12))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], model


def assert_same_run(tmp_path, config, backend: str) -> None:
    torch._dynamo.reset()
    eager_losses, eager = train_with(tmp_path / "eager", config)
    counters.clear()
    compiled_losses, compiled = train_with(tmp_path / backend, config, torch_compile=True,
                                           torch_compile_backend=backend)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # compiled, in one piece
    assert len(eager_losses) == 3 and eager_losses[0] > 1.0
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    for (name, expected), actual in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("config_class", [PosVarLlamaConfig, PosVarDiffConfig], ids=["llama", "diff"])
def test_trainer_torch_compile_traced_gives_the_eager_losses(tmp_path, config_class):
    """The Trainer's flag with the aot_eager backend: dynamo and AOT autograd trace forward and backward,
    without inductor's C++ code generation (which takes ~40 s on two busy cores; see the slow test)."""
    assert_same_run(tmp_path, tiny_config(config_class, "alibi"), "aot_eager")


@pytest.mark.slow
def test_trainer_torch_compile_inductor_gives_the_eager_losses(tmp_path):
    assert_same_run(tmp_path, tiny_config(PosVarDiffConfig, "rope"), "inductor")
