"""DeepSpeed ZeRO-3: the shipped configs, read by accelerate's launcher and DeepSpeed's own parser, and two CPU
processes training through the pipeline under ZeRO-3 (built partitioned by zero.Init, checkpointed, stopped,
resumed) with one process's weights. The slow tests need `pip install -e .[deepspeed]` and are skipped without it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_posvariants import position_encodings
from hf_posvariants.training import pipeline
from hf_posvariants.training.zero3 import parameter_count, weight_files
from tests.conftest import FAMILY_CONFIGS, TORCHRUN, tiny_config
from tests.test_training import ROOT, _one_thread, tiny_argv  # noqa: F401  (autouse fixture)

ACCELERATE_CONFIG = ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"
DEEPSPEED_CONFIG = ROOT / "configs" / "scale_out" / "deepspeed_zero3.json"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED,
                                     reason="deepspeed is not installed (pip install -e .[deepspeed])")


def deepspeed_launch(*extra: str) -> tuple[list[str] | None, dict[str, str]]:
    """What `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml` would run through DeepSpeed's
    runner (None: torchrun on this machine instead) and the environment each process gets, computed as accelerate's
    DeepSpeed launcher computes them (no process is started)."""
    parsed = launch_command_parser().parse_args(["--config_file", str(ACCELERATE_CONFIG), *extra, "scripts/train.py"])
    args, defaults, precision_from_config = _validate_launch_command(parsed)
    assert args.use_deepspeed, "the config does not select accelerate's DeepSpeed launcher"
    # As `accelerate.commands.launch.launch_command` sets it before calling the DeepSpeed launcher.
    fields = [*defaults.deepspeed_config, *(["mixed_precision"] if precision_from_config else [])]
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return prepare_deepspeed_cmd_env(args)


def test_accelerate_config_selects_zero3_from_the_shipped_json(monkeypatch):
    """accelerate's plugin, built from the launcher's environment, reads the JSON (relative to the repository root,
    where the README's commands run): ZeRO stage 3, the model built partitioned, and the weights gathered into
    model.safetensors at every save (checkpoint sealing, `from_pretrained` and the Hub read that file)."""
    with pytest.raises(ValueError, match="num_processes"):
        deepspeed_launch()  # no silent process count on a machine without GPUs
    # 8 machines start like ddp.yaml's, torchrun on each, not through DeepSpeed's runner (pdsh over ssh, a hostfile).
    nodes = ("--num_processes", "64", "--num_machines", "8", "--machine_rank", "3", "--main_process_ip", "HOST")
    assert deepspeed_launch(*nodes)[0] is None
    monkeypatch.chdir(ROOT)
    for key, value in deepspeed_launch("--num_processes", "2")[1].items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # refuses accelerate-side settings that the JSON would silently override
    assert plugin.zero_stage == 3 and plugin.hf_ds_config.is_zero3() and plugin.zero3_init_flag
    assert plugin.zero3_save_16bit_model
    assert plugin.deepspeed_config["zero_optimization"]["offload_param"]["device"] == "none"
    # The recipe decides batch sizes, accumulation, clipping and precision: the Trainer fills these in.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert plugin.is_auto(key), key
    assert plugin.is_auto("bf16.enabled") and plugin.is_auto("fp16.enabled")
    assert "optimizer" not in plugin.deepspeed_config and "scheduler" not in plugin.deepspeed_config


@needs_deepspeed
def test_deepspeed_parses_the_json_as_the_trainer_fills_it(tmp_path):
    """transformers fills the "auto" values from the recipe's arguments; DeepSpeed's own parser then reads the result
    (batch arithmetic, ZeRO fields) as its engine will."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments

    arguments = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(DEEPSPEED_CONFIG), use_cpu=True,
                                  per_device_train_batch_size=4, gradient_accumulation_steps=8, bf16=True)  # fmt: skip
    config = arguments.hf_deepspeed_config.config
    assert config["train_batch_size"] == 4 * 8 * arguments.world_size
    parsed = DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == 3 and parsed.zero_config.gather_16bit_weights_on_model_save
    assert parsed.gradient_clipping == arguments.max_grad_norm
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled  # the recipe's bf16: true


@needs_deepspeed
def test_deepspeed_with_a_distributed_mapping_or_on_use_cpu_is_refused(tmp_path):
    argv = tiny_argv(tmp_path, "clm", "posvar_llama", "--deepspeed", str(DEEPSPEED_CONFIG))
    with pytest.raises(ValueError, match=r"use_cpu=true cannot run DeepSpeed: .* add --use_cpu false"):
        pipeline.parse(argv)  # the tiny recipe's use_cpu: true
    argv.extend(["--use_cpu", "false"])
    with pytest.raises(ValueError, match=r"distributed .* and DeepSpeed .* would both shard the model; allowed is one"):
        pipeline.parse([*argv, "--distributed", json.dumps({"fsdp_size": 2})])
    assert pipeline.parse(argv)[2].hf_deepspeed_config.is_zero3()


def test_fire_is_refused_under_zero3_with_the_reason(monkeypatch):
    """DeepSpeed's zero.Init cannot partition FIRE's 0-d parameters (it dies in a byte view of each one): refused
    by name when the model is built, every other encoding builds (the slow test below builds them all)."""
    monkeypatch.setattr(position_encodings, "is_deepspeed_zero3_enabled", lambda: True)
    for config_class in FAMILY_CONFIGS:
        with pytest.raises(ValueError, match=r"position_encoding='fire' cannot be built under DeepSpeed ZeRO-3"):
            AutoModelForCausalLM.from_config(tiny_config(config_class, "fire"))
        AutoModelForCausalLM.from_config(tiny_config(config_class, "t5_bias"))


def test_parameter_count_counts_partitioned_parameters_whole():
    """The run record's count: ZeRO-3 leaves each parameter an empty tensor outside forward and its size in
    `ds_numel` (as the slow test below checks on real partitions); transformers' count then reads 0."""
    model = AutoModelForCausalLM.from_config(tiny_config(FAMILY_CONFIGS[0], "t5_bias"))
    whole = model.num_parameters()
    for parameter in model.parameters():
        parameter.ds_numel, parameter.data = parameter.numel(), torch.empty(0)
    assert model.num_parameters() == 0 and parameter_count(model) == whole


def test_weight_files_name_the_file_of_every_tensor_whole_or_sharded(tmp_path):
    """What a resumed ZeRO-3 run reads its final weights from (`load_into_partitioned`): one file or shards."""
    model = AutoModelForCausalLM.from_config(tiny_config(FAMILY_CONFIGS[0], "t5_bias"))
    model.save_pretrained(tmp_path / "whole")
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    whole, shards = weight_files(tmp_path / "whole"), weight_files(tmp_path / "shards")
    assert set(whole.values()) == {tmp_path / "whole" / "model.safetensors"} and len(set(shards.values())) > 2
    assert whole.keys() == shards.keys() and "model.position_encoding.relative_attention_bias.weight" in shards
    for name, path in shards.items():
        torch.testing.assert_close(load_file(path)[name], load_file(whole[name])[name], rtol=0, atol=0)


# accelerate 1.16 gives DeepSpeed a process group only on an accelerator: in CPU processes its PartialState finds no
# backend, records one process, and every rank takes itself for rank 0. DeepSpeed's own CPU accelerator talks gloo;
# the drivers below name that backend to accelerate, as a GPU machine would name NCCL. Nothing else is changed.
GLOO_FOR_DEEPSPEED = """
import os
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend

def _gloo_for_deepspeed(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if found is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU
    return found, kind

PartialState._prepare_backend = _gloo_for_deepspeed
"""

# One rank under ZeRO-3; with a step given, the run stops right after that checkpoint is sealed (as a killed job would).
ZERO3_RUN = GLOO_FOR_DEEPSPEED + """
import json, sys
import torch
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from hf_posvariants.training import pipeline

class StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            raise KeyboardInterrupt(f"stopped after the checkpoint of step {state.global_step}")

class Record(TrainerCallback):
    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # Every parameter is ZeRO-3's, and the rank holds half of them (tensors under the persistence threshold whole).
        held = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_id"))
        whole = sum(p.ds_numel for p in model.parameters() if hasattr(p, "ds_id"))
        self.partitioned = all(hasattr(p, "ds_id") for p in model.parameters()) and held < 0.75 * whole

record = Record()
metrics = pipeline.main(json.loads(sys.argv[1]), callbacks=[StopAfterSave(), record])
with open(os.path.join(sys.argv[3], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"metrics": metrics, "world": torch.distributed.get_world_size(), "zero3": is_deepspeed_zero3_enabled(),
               "partitioned": record.partitioned}, f)
"""

# Every family × encoding built from its config under ZeRO-3 (transformers' zero.Init path), gathered, compared
# with the same config built in one process: every parameter equal on both ranks, every buffer and every
# deterministic parameter equal to one process's, every random one drawn (transformers draws them in another order
# under zero.Init, so not the same numbers) with one process's spread.
ZERO3_INIT = """
import copy, json, sys
import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from hf_posvariants import FAMILIES
from tests.conftest import ENCODINGS, tiny_config

torch.set_num_threads(1)
deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 2}

def gathered(model):
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

problems, refused, built = [], {}, 0
for config_class, heads in FAMILIES.items():
    deberta = config_class.attention_variant == "disentangled"
    for encoding in ["nope", "learned"] if deberta else ENCODINGS:  # DeBERTa adds relative terms to either
        for head in (AutoModelForCausalLM, AutoModelForMaskedLM):
            if head not in heads:
                continue
            case = f"{config_class.model_type}/{encoding}/{head.__name__}"
            config = tiny_config(config_class, encoding, **({"position_buckets": 8} if deberta else {}))
            zero3 = HfDeepSpeedConfig(ZERO3)  # transformers reads it through a weak reference while it lives
            try:
                model = head.from_config(copy.deepcopy(config))
            except ValueError as error:
                refused[case] = str(error)
                continue
            finally:
                del zero3
                unset_hf_deepspeed_config()
            built += 1
            state, buffers = gathered(model), dict(model.named_buffers())
            reference = head.from_config(copy.deepcopy(config))
            ranks = [None, None]
            torch.distributed.all_gather_object(ranks, state)
            for name, tensor in reference.named_buffers():
                if not torch.equal(buffers[name], tensor):
                    problems.append(f"{case}: buffer {name} differs from one process's")
            for name, expected in reference.state_dict().items():
                got = state[name]
                if not torch.equal(ranks[0][name], ranks[1][name]):
                    problems.append(f"{case}: {name} differs between the ranks")
                if got.shape != expected.shape:
                    problems.append(f"{case}: {name} has shape {tuple(got.shape)}, one process {tuple(expected.shape)}")
                elif expected.numel() == 1 or bool((expected == expected.flatten()[0]).all()):
                    if not torch.equal(got, expected):
                        problems.append(f"{case}: {name} should be {expected.flatten()[0].item()} everywhere")
                elif bool((got == got.flatten()[0]).all()):
                    problems.append(f"{case}: {name} was left constant, one process draws it")
                # Two samples' spreads: at 1024 values the ratio's noise is ~3%; another init scheme is off by 2-5x.
                elif expected.numel() >= 1024 and not 0.8 < got.std().item() / expected.std().item() < 1.25:
                    spreads = f"std {got.std().item():.3g}, one process {expected.std().item():.3g}"
                    problems.append(f"{case}: {name} {spreads}")
if deepspeed.comm.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"built": built, "refused": refused, "problems": problems}, f)
"""

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def torchrun(driver: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "--nproc_per_node", "2", str(driver), *args],
                          env=ENV, capture_output=True, text=True, timeout=900)  # fmt: skip


def accelerate_launch(driver: Path, *args: str) -> subprocess.CompletedProcess:
    """Two processes as the README's command starts them on GPUs, from the repository root (the accelerate config
    names the JSON relative to it)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
               "--num_processes", "2", str(driver), *args]  # fmt: skip
    return subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)


@needs_deepspeed
@pytest.mark.slow  # one torchrun pair building 86 tiny models twice each: about 40 s on 2 cores
def test_every_family_and_encoding_initialises_under_zero3(tmp_path):
    driver = tmp_path / "zero3_init.py"
    driver.write_text(ZERO3_INIT)
    result = torchrun(driver, str(tmp_path / "init.json"))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "init.json").read_text())
    assert report["problems"] == []
    families = ("posvar_diff", "posvar_llama", "posvar_transformer")
    heads = ("AutoModelForCausalLM", "AutoModelForMaskedLM")
    assert sorted(report["refused"]) == [f"{family}/fire/{head}" for family in families for head in heads]
    assert all("cannot be built under DeepSpeed ZeRO-3" in error for error in report["refused"].values())
    assert report["built"] > 70


# (objective, family, encoding, the steps whose checkpoint a launch stops after): the causal families with a rotary,
# a learned-bias and a fixed-bias encoding, and DeBERTa as a masked LM. The transformer family ties its embeddings;
# it also stops after the last step's checkpoint (before the final model is written), whose weights the same command
# then loads into the partitioned model without training further.
ZERO3_CASES = [
    ("clm", "posvar_llama", "rope", (2,)),
    ("clm", "posvar_transformer", "t5_bias", (2, 4)),
    ("clm", "posvar_diff", "alibi", (2,)),
    ("mlm", "posvar_deberta", "nope", (2,)),
]
# DeBERTa's disentangled attention: a key head per query head, short log buckets.
DEBERTA_FIELDS = ["--model.attention_variant", "disentangled", "--model.num_key_value_heads", "4",
                  "--model.position_buckets", "8"]  # fmt: skip


def zero3_argv(output_dir: Path, objective: str, family: str, encoding: str, *extra: str) -> list[str]:
    fields = DEBERTA_FIELDS if family == "posvar_deberta" else []
    return tiny_argv(output_dir, objective, family, "--model.position_encoding", encoding, *fields, *extra)


@needs_deepspeed
@pytest.mark.slow  # per case: a one-process start and reference, then two launches of 2 processes: 2-3 min on 2 cores
@pytest.mark.parametrize(("objective", "family", "encoding", "stops"), ZERO3_CASES, ids=str)
def test_two_process_zero3_checkpoints_resumes_and_matches_one_process(tmp_path, objective, family, encoding, stops):
    """Both runs fine-tune the same starting weights (a fresh ZeRO-3 model draws them in another order, see above):
    4 steps, a checkpoint every 2, 8 blocks a step: one process accumulates the two micro-batches of 4 that the two
    ranks take (the masked-LM collator draws masks from each micro-batch's tokens)."""
    start = tmp_path / "start"
    pipeline.main(zero3_argv(start, objective, family, encoding, "--max_steps", "1", "--learning_rate", "0",
                             "--eval_strategy", "no"))  # fmt: skip
    run = ("--model_name_or_path", str(start), "--max_steps", "4", "--save_steps", "2", "--eval_steps", "4")
    one = pipeline.main(zero3_argv(tmp_path / "one", objective, family, encoding, *run,
                                   "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"))

    driver = tmp_path / "zero3_driver.py"
    driver.write_text(ZERO3_RUN)
    # use_cpu: the tiny recipes set it, and accelerate then runs plain CPU data parallelism instead of DeepSpeed.
    argv = zero3_argv(tmp_path / "zero3", objective, family, encoding, *run, "--per_device_train_batch_size", "4",
                      "--use_cpu", "false")  # fmt: skip
    for step in stops:  # the same command each time
        stopped = accelerate_launch(driver, json.dumps(argv), str(step), str(tmp_path))
        assert stopped.returncode != 0, stopped.stderr[-4000:]
        assert f"stopped after the checkpoint of step {step}" in stopped.stderr, stopped.stderr[-4000:]
        checkpoint = tmp_path / "zero3" / f"checkpoint-{step}"
        shards = sorted(path.name for path in (checkpoint / f"global_step{step}").iterdir())
        # DeepSpeed's own checkpoint: each rank's partition of the weights and of the optimizer state.
        assert shards == sorted(f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1)
                                for kind in ("model", "optim"))  # fmt: skip
        assert not (tmp_path / "zero3" / f"checkpoint-{step + 2}").exists()
        assert not (tmp_path / "zero3" / "model.safetensors").exists()

    resumed = accelerate_launch(driver, json.dumps(argv), "0", str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"Resuming from {checkpoint}" in resumed.stdout
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(rank["world"], rank["zero3"], rank["partitioned"]) for rank in ranks] == [(2, True, True)] * 2
    for rank in ranks:
        assert rank["metrics"]["eval_perplexity"] == pytest.approx(ranks[0]["metrics"]["eval_perplexity"], rel=1e-12)
        # Evaluation batches split over the ranks differ from one process's, and so would their masks.
        if objective == "clm":
            assert rank["metrics"]["eval_perplexity"] == pytest.approx(one["eval_perplexity"], rel=1e-5)
    records = [json.loads((tmp_path / run / "run_args.json").read_text()) for run in ("one", "zero3")]
    assert records[1]["num_parameters"] == records[0]["num_parameters"] > 0  # ZeRO-3 leaves parameters empty
    for folder in ("", "checkpoint-2", "checkpoint-4"):
        got = load_file(tmp_path / "zero3" / folder / "model.safetensors")
        expected = load_file(tmp_path / "one" / folder / "model.safetensors")
        assert got.keys() == expected.keys()
        for key in expected:
            # Adam divides by the root of tiny second moments: float reduction order shows up to ~2e-5 there.
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=5e-5, msg=key)
