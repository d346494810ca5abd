"""The training pipeline behind `scripts/train.py`, in the manner of transformers' run_clm/run_mlm.

    recipe (YAML) + command line → HfArgumentParser(ModelArguments, DataArguments, TrainingArguments)
    → data splits → tokenizer (loaded, or trained on the data) → blocks (datasets.map)
    → model (from the recipe's `model:` fields, or from a checkpoint) → Trainer → export + metrics.

Every check that can fail on the user's input runs before the Trainer is built. The output folder is
locked for the run and resumed by the same command (`run_folder`); a Hub token goes to `HfApi` only.
The Python entry point is `train_recipe(recipe, overrides) -> RunResult(output_dir, metrics)`.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import evaluate
import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..bias_route import SCORE_FUNCTION_BACKENDS
from ..configuration_posvariants import PosVarConfig
from ..lm_loss import LM_LOSSES
from ..position_encodings import ScoreBiasEncoding
from . import fused_loss  # noqa: F401  (registers lm_loss="liger" where liger-kernel is installed)
from .data import (
    IGNORE_INDEX,
    TEXT_UNITS,
    SeededMasking,
    TextColumn,
    column_chosen_by_older_versions,
    content_hash,
    drop_unusable_texts,
    hold_out,
    load_splits,
    pack_blocks,
    text_column_of,
)
from .context_parallel import check_context_parallel_request
from .distributed import check_trainable_on, distributed_config_from, load_distributed, trainer_class
from .export import make_remote_loadable
from .hub import CARD_FILE, HubPusher, render_model_card
from .metrics import POSVAR_ACCURACY
from .preemption import RunStopped, SaveAndStopOnSigterm
from .recipes import check_config_fields, parse_recipe, recipe_argv
from .run_folder import (
    RUN_RECORD_FILE,
    TRAINER_STATE_NAME,
    OutputDirError,
    RunLock,
    RunPlan,
    checkpoints,
    is_complete,
    naming_a_full_disk,
    prepare,
    read_run_record,
    rotate,
    run_settings,
    seal_checkpoint,
    write_run_record,
)
from .tokenizer import train_tokenizer
from .zero3 import load_into_partitioned, parameter_count

logger = logging.getLogger(__name__)

OBJECTIVES = ("clm", "mlm")
TASKS = ("lm", "sequence_classification")
ALL_RESULTS_FILE = "all_results.json"


@dataclass
class ModelArguments:
    """Which model to train: a family config built from the recipe's `model:` fields, or a checkpoint."""

    model_type: str = field(default="posvar_llama", metadata={"help": "Family config for training from scratch."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Checkpoint (folder or Hub id) to fine-tune."})
    objective: str = field(default="clm", metadata={"help": f"Language-modelling objective: {OBJECTIVES}."})
    task: str = field(default="lm", metadata={"help": f"What to train: {TASKS}."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder or Hub id; else trained."})
    tokenizer_vocab_size: int = field(default=1000, metadata={"help": "Vocabulary of a tokenizer trained here."})
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "eager, sdpa, flex_attention, …, or auto: flex attention on CUDA for a learned position bias, else sdpa"})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow checkpoints that ship model code."})
    torch_num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for torch; 1 is fastest for tiny models (measured 20x on 2 cores)."}
    )
    lm_loss: str = field(
        default="plain",
        metadata={"help": "Causal-LM training loss: plain, chunked (no full fp32 logits), liger (fused; GPU, liger-kernel)."},
    )
    distributed: str | None = field(default=None, metadata={
        "help": "transformers' DistributedConfig fields as JSON (a `distributed:` mapping in the recipe): fsdp_size, "
                "dp_replicate_size, tp_size, pp_size, fsdp_cpu_offload, fsdp_mixed_precision."})  # fmt: skip


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut; the built-in position tasks by default."""

    dataset_name: str | None = field(default="builtin", metadata={"help": "'builtin' or a `datasets` Hub name."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config of the Hub dataset."})
    train_file: str | None = field(default=None, metadata={"help": "Text/JSON lines/CSV file or folder."})
    validation_file: str | None = field(default=None, metadata={"help": "Like train_file; else held out."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (JSON, CSV, datasets); "
                             "chosen by name only, refused when missing."})  # fmt: skip
    max_dropped_fraction: float = field(default=0.05, metadata={
        "help": "Largest share of rows whose text is missing, null or blank that may be dropped before training is "
                "refused (blank lines of .txt files do not count)."})  # fmt: skip
    label_column: str = field(default="label", metadata={"help": "Label column for sequence classification."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Held out when there is no validation split."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training block (max length for tasks)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens masked for objective mlm."})
    builtin_examples: int = field(default=2000, metadata={"help": "Number of built-in task lines."})
    text_unit: str = field(default="document", metadata={"help": f"One training text per {TEXT_UNITS} of a .txt "
                           "file; each keeps its newlines and ends with the end token."})  # fmt: skip
    preprocessing_num_workers: int | None = field(default=None, metadata={
        "help": "Processes for datasets.map (sequence classification); language-model blocks are packed in one "
                "process, whose tokenizer uses every core."})  # fmt: skip


@dataclass
class PosVarTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments, plus the output-folder guard of run_clm."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start a new run in an output_dir that holds another run (by default that is refused, and the "
                "same command resumes its own run)."})  # fmt: skip
    allow_model_only_resume: bool = field(default=False, metadata={
        "help": "Resume from a checkpoint saved with save_only_model=True (refused by default: the optimizer, the "
                "learning-rate schedule and the random state start afresh)."})  # fmt: skip


def _choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values are {list(allowed)}.")


def check_block_size(config: PosVarConfig, block_size: int) -> None:
    """A learned (bounded) table has no row for positions past max_position_embeddings."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be at least 2.")
    if config.position_encoding_class.bounded and block_size > config.max_position_embeddings:
        raise ValueError(
            f"block_size={block_size} is longer than the table of position_encoding={config.position_encoding!r} "
            f"(max_position_embeddings={config.max_position_embeddings}); allowed block sizes are "
            f"2..{config.max_position_embeddings}."
        )


def load_or_train_tokenizer(model_args: ModelArguments, texts, resume_folder: str | None):
    """The tokenizer named by the recipe, else the checkpoint's (a plain Trainer's may have none), else one
    trained on `texts`."""
    if resume_folder is not None and not (Path(resume_folder) / "tokenizer_config.json").is_file():
        resume_folder = None
    source = model_args.tokenizer_name or resume_folder or model_args.model_name_or_path
    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
        if tokenizer.pad_token is None:  # GPT-2-style tokenizers have none; the collators need one to pad
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return train_tokenizer(texts, model_args.objective, model_args.tokenizer_vocab_size)


def build_config(model_args: ModelArguments, model_fields: dict, tokenizer) -> PosVarConfig:
    """The recipe's `model:` fields on the family config, special-token ids and vocabulary from the tokenizer."""
    if model_args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
        check_config_fields(config.model_type, model_fields)
        for key, value in model_fields.items():
            setattr(config, key, value)
        config.validate_architecture()
        return config
    config_class = check_config_fields(model_args.model_type, model_fields)
    fields = dict(model_fields)
    fields.setdefault("vocab_size", len(tokenizer))
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size={fields['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens.")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        fields.setdefault(name, getattr(tokenizer, name))
    return config_class(**fields)


def _head(model_args: ModelArguments):
    if model_args.task == "sequence_classification":
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM if model_args.objective == "clm" else AutoModelForMaskedLM


def lm_eval_outputs(objective: str):
    """`preprocess_logits_for_metrics` keeping, per position, (predicted id, NLL of the label, label),
    aligned so a causal model's prediction at t is scored against token t+1."""

    def preprocess(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if objective == "clm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return torch.stack((logits.argmax(-1).float(), nll, labels.float()), dim=-1)  # (B, T', 3)

    return preprocess


def lm_metrics(metric):
    def compute(eval_prediction) -> dict:
        outputs = eval_prediction.predictions.reshape(-1, 3)
        references = outputs[:, 2].round().astype("int64")
        # Padding added by the Trainer when it gathers batches is -100 in every column.
        return metric.compute(predictions=outputs[:, 0].round().astype("int64"), references=references,
                              token_nll=outputs[:, 1])

    return compute


def classification_metrics(metric):
    def compute(eval_prediction) -> dict:
        logits = eval_prediction.predictions[0] if isinstance(eval_prediction.predictions, tuple) else eval_prediction.predictions
        return metric.compute(predictions=logits.argmax(-1), references=eval_prediction.label_ids)

    return compute


def classification_splits(splits, tokenizer, data_args: DataArguments):
    """Tokenize text/label pairs; string labels become ids in sorted order. Returns (splits, id2label)."""
    train = splits["train"]
    text_column = text_column_of(train, data_args.text_column)
    if data_args.label_column not in train.column_names:
        raise ValueError(
            f"label_column={data_args.label_column!r} is not a column of the data; allowed values are {train.column_names}."
        )
    labels = sorted({str(label) for split in splits.values() for label in split[data_args.label_column]})
    if len(labels) < 2:
        raise ValueError(f"sequence classification needs at least two labels; the data has {labels}.")
    label_ids = {label: index for index, label in enumerate(labels)}

    def encode(batch):
        encoded = tokenizer(batch[text_column], truncation=True, max_length=data_args.block_size)
        encoded["labels"] = [label_ids[str(label)] for label in batch[data_args.label_column]]
        return encoded

    encoded = splits.map(encode, batched=True, remove_columns=train.column_names, num_proc=data_args.preprocessing_num_workers)
    return encoded, dict(enumerate(labels))


USAGE = """train.py RECIPE.yaml [--key value ...] [--model.field value ...]

  RECIPE.yaml          a recipe from configs/ (every key is commented there)
  --key value          overrides a recipe key: any argument listed below, e.g. --max_steps 100
  --model.field value  overrides a field of the model config, e.g. --model.position_encoding alibi

examples:
  python scripts/train.py configs/tiny_clm.yaml
  python scripts/train.py configs/tiny_mlm.yaml --model.position_encoding alibi --max_steps 100
  python scripts/train.py configs/small_clm.yaml --train_file notes.txt --output_dir runs/notes

Running the same command again resumes the run from its newest complete, intact checkpoint;
--enable_jit_checkpoint true saves one on SIGTERM and exits with status 143.
"""


def parse(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, PosVarTrainingArguments), usage=USAGE)
    (model_args, data_args, training_args), model_fields = parse_recipe(parser, argv)
    _choice("objective", model_args.objective, OBJECTIVES)
    _choice("task", model_args.task, TASKS)
    if model_args.lm_loss != "plain" and (model_args.objective, model_args.task) != ("clm", "lm"):
        raise ValueError(f"lm_loss={model_args.lm_loss!r} applies to objective='clm', task='lm'; allowed value "
                         "for other objectives and tasks is 'plain'.")
    _choice("lm_loss", model_args.lm_loss, ["plain", *LM_LOSSES])
    if model_args.task == "sequence_classification" and model_args.model_name_or_path is None:
        raise ValueError("task='sequence_classification' fine-tunes a checkpoint: set model_name_or_path.")
    for name in ("model_name_or_path", "tokenizer_name"):
        check_local_source(getattr(model_args, name), name)
    distributed_config = distributed_config_from(model_args.distributed)
    if training_args.deepspeed_plugin is not None and training_args.use_cpu:
        # accelerate then starts CPU processes without DeepSpeed's engine, while transformers still builds the model
        # partitioned for ZeRO-3: it would fail at the first step, or train nothing.
        raise ValueError("use_cpu=true cannot run DeepSpeed: accelerate starts plain CPU processes then. Allowed with "
                         "DeepSpeed is use_cpu=false (the tiny recipes set true: add --use_cpu false).")
    if distributed_config is not None and training_args.deepspeed_plugin is not None:
        raise ValueError("distributed (transformers' DistributedConfig) and DeepSpeed (the deepspeed key, or "
                         "accelerate's DeepSpeed config) would both shard the model; allowed is one of them: drop the "
                         "`distributed:` mapping, or launch without DeepSpeed.")  # fmt: skip
    if distributed_config is not None:  # reading the device sets up the process group: only for a distributed run
        check_trainable_on(distributed_config, training_args.device.type)
    return model_args, data_args, training_args, model_fields


def check_local_source(name: str | None, field_name: str) -> None:
    """Refuse at once a checkpoint/tokenizer name that can only be a missing local folder (rather than
    letting transformers try the Hub with retries), or any missing one when the Hub is offline."""
    if name is None or Path(name).expanduser().exists():
        return
    try:
        validate_repo_id(name)
        could_be_hub_id = not Path(name).parent.is_dir() or Path(name).parent == Path(".")
    except HFValidationError:
        could_be_hub_id = False
    if not could_be_hub_id:
        raise ValueError(f"{field_name}={name!r} does not exist: it is not a local folder, nor a Hub id.")
    if constants.is_offline_mode():
        raise ValueError(f"{field_name}={name!r} is not a local folder, and HF_HUB_OFFLINE is set, so it cannot be "
                         "fetched from the Hub.")


def task_inputs(model_args, data_args, training_args, splits, text_column, tokenizer, config):
    """(datasets, collator, compute_metrics, preprocess_logits_for_metrics) of the task; sets the labels in `config`."""
    metric = evaluate.load(POSVAR_ACCURACY)
    if model_args.task == "sequence_classification":
        splits = hold_out(splits, data_args.validation_fraction, training_args.seed, "examples", shuffle=True)
        datasets_, id2label = classification_splits(splits, tokenizer, data_args)
        config.id2label, config.label2id = id2label, {label: i for i, label in id2label.items()}
        return datasets_, DataCollatorWithPadding(tokenizer), classification_metrics(metric), None
    if model_args.objective == "mlm" and tokenizer.mask_token is None:
        raise ValueError(f"objective='mlm' needs a tokenizer with a mask token; {type(tokenizer).__name__} has none.")
    with training_args.main_process_first(desc="packing"):
        packed = pack_blocks(splits, tokenizer, text_column, data_args.block_size)
    datasets_ = hold_out(packed, data_args.validation_fraction, training_args.seed,
                         f"blocks of block_size={data_args.block_size} tokens", shuffle=False)  # fmt: skip
    if model_args.objective == "mlm":
        collator = SeededMasking(tokenizer, mlm_probability=data_args.mlm_probability, mask_seed=training_args.seed)
    else:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return datasets_, collator, lm_metrics(metric), lm_eval_outputs(model_args.objective)


AUTO_BACKEND = "auto"


def build_backend(requested: str) -> str:
    """The backend a model is built on for a requested `attn_implementation`: `auto` builds on SDPA."""
    return "sdpa" if requested == AUTO_BACKEND else requested


def learned_score_bias(model) -> bool:
    """Whether any layer's position encoding adds a score bias with trainable parameters (T5, KERPLE, FIRE, the MLP
    bias); ALiBi's slopes are fixed."""
    base = model.base_model
    encodings = [getattr(base, "position_encoding", None), *getattr(base, "scheduled_encodings", {}).values()]
    return any(isinstance(encoding, ScoreBiasEncoding) and any(p.requires_grad for p in encoding.parameters())
               for encoding in encodings)


def training_backend(model, device_type: str) -> str:
    """What `attn_implementation: auto` trains with. Flex on CUDA for a learned score bias, where every component runs
    on flex: its per-distance table trains the bias without a (B, H, Q, K) gradient (one H200, 8 × 2048, ~125M: T5
    1.17× RoPE's step on flex against 1.55× through an SDPA mask, docs/speed/gpu_h200). SDPA otherwise: flex has no
    backward on the CPU, and a fixed bias trains as fast through SDPA's mask (ALiBi 0.93× against 0.97× on flex)."""
    flex = SCORE_FUNCTION_BACKENDS[0]
    if device_type != "cuda" or not learned_score_bias(model):
        return "sdpa"
    try:
        model.config.check_attention_backend(flex)
    except ValueError:
        return "sdpa"
    return flex


def build_model(model_args: ModelArguments, config: PosVarConfig, output_dir: str | None = None):
    """The task head, fresh from `config` or with the checkpoint's weights; sharded by transformers when the recipe
    has a `distributed:` mapping. `attn_implementation: auto` builds on SDPA, then moves to `training_backend`."""
    head = _head(model_args)
    requested = model_args.attn_implementation
    backend = build_backend(requested)
    distributed_config = distributed_config_from(model_args.distributed)
    if distributed_config is not None:
        model = load_distributed(head, config, model_args.model_name_or_path, distributed_config, output_dir,
                                 trust_remote_code=model_args.trust_remote_code,
                                 attn_implementation=backend)  # fmt: skip
    elif model_args.model_name_or_path is None:
        model = head.from_config(config, attn_implementation=backend)
    else:
        model = head.from_pretrained(model_args.model_name_or_path, config=config,
                                     trust_remote_code=model_args.trust_remote_code, attn_implementation=backend)
    if requested == AUTO_BACKEND:
        chosen = training_backend(model, "cuda" if torch.cuda.is_available() else "cpu")
        if chosen != backend:
            model.set_attn_implementation(chosen)
        logger.info("attn_implementation auto: training on %s", chosen)
    if model_args.lm_loss != "plain":
        model.use_lm_loss(model_args.lm_loss)
    return model


class CheckpointCallback(TrainerCallback):
    """Finishes every checkpoint the Trainer writes: the family's full `auto_map` (so it loads with remote
    code), the model card when pushing, then the run record that marks it complete; then pushes it and
    deletes this run's checkpoints beyond `keep` (the Trainer's own rotation is off: it would delete any
    `checkpoint-*` folder, complete or not, this run's or not)."""

    def __init__(self, config_class: type, record: dict, keep: int | None, pusher: HubPusher | None = None):
        self.config_class, self.record, self.keep, self.pusher = config_class, record, keep, pusher

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return control
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        make_remote_loadable(folder, self.config_class)
        if self.pusher is not None:
            render_model_card(folder, self.pusher.repo_id, run=self.record).save(folder / CARD_FILE)
        seal_checkpoint(folder, self.record, state.global_step)
        if self.pusher is not None:
            self.pusher.push_checkpoint(folder, state.global_step)
        rotate(args.output_dir, self.record["run_id"], self.keep, {str(state.best_model_checkpoint)},
               before_delete=self.pusher.wait if self.pusher is not None else lambda path: None)  # fmt: skip
        return control


@dataclass
class RunResult:
    """Where a run wrote its model and what it measured."""

    output_dir: str
    metrics: dict


def train_recipe(recipe: str | Path | dict, overrides: dict | list[str] | None = None, callbacks: list | None = None,
                 hub_client=None) -> RunResult:
    """Run a recipe (a YAML path, or the same keys as a dict) with overrides (`{"max_steps": 10,
    "model.hidden_size": 64}` or command-line tokens). The Python entry point of `scripts/train.py`."""
    argv = [str(recipe)] if isinstance(recipe, (str, Path)) else recipe_argv(recipe)
    if isinstance(overrides, dict):
        overrides = recipe_argv(overrides)
    return run(argv + list(overrides or []), callbacks, hub_client)


def main(argv: list[str], callbacks: list | None = None, hub_client=None) -> dict:
    """Run `scripts/train.py`'s command line; returns the final metrics. A run stopped before its last step
    exits with its `RunStopped.exit_code`, saying where it stopped."""
    try:
        return run(argv, callbacks, hub_client).metrics
    except RunStopped as stopped:
        print(stopped, file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None


def run(argv: list[str], callbacks: list | None = None, hub_client=None) -> RunResult:
    """Parse, check, then train in a locked output folder. `hub_client` stands in for `huggingface_hub.HfApi`."""
    model_args, data_args, training_args, model_fields = parse(argv)
    # The token goes to HfApi only: TrainingArguments are pickled into training_args.bin in every checkpoint.
    token, training_args.hub_token = training_args.hub_token, None
    # Pushing is ours (the Trainer's pushes send whole folders and leave out the model code).
    push, training_args.push_to_hub = training_args.push_to_hub, False
    keep, training_args.save_total_limit = training_args.save_total_limit, None
    # SIGTERM's checkpoint is ours too: the Trainer's is written past `on_save`, so it would not be sealed.
    preemptible, training_args.enable_jit_checkpoint = training_args.enable_jit_checkpoint, False
    # Every parameter of our models takes part in every step, so DDP need not search for unused ones.
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False
    if model_args.torch_num_threads is not None:
        torch.set_num_threads(model_args.torch_num_threads)
    pusher = None
    if push and training_args.should_save:
        repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
        pusher = HubPusher(hub_client or HfApi(token=token), repo_id, training_args.hub_strategy,
                           training_args.hub_private_repo)  # fmt: skip
        pusher.check_access(training_args.output_dir)
    settings = run_settings({"model": model_fields, "model_args": asdict(model_args), "data_args": asdict(data_args),
                             "training_args": training_args.to_dict()})  # fmt: skip
    with RunLock(training_args.output_dir) if training_args.should_save else nullcontext():
        with training_args.main_process_first(desc="output_dir"):
            plan = prepare(training_args.output_dir, settings, training_args.resume_from_checkpoint,
                           training_args.overwrite_output_dir, training_args.allow_model_only_resume)  # fmt: skip
        if training_args.should_save:
            for note in plan.notes:
                print(note)
        if plan.finished:
            metrics = json.loads((Path(training_args.output_dir) / ALL_RESULTS_FILE).read_text())
            if pusher is not None:  # the same command with --push_to_hub added: push what was trained
                publish_final(Path(training_args.output_dir), pusher, read_run_record(training_args.output_dir))
        else:
            with SaveAndStopOnSigterm() as stop, naming_a_full_disk(training_args.output_dir):
                metrics = _train(model_args, data_args, training_args, model_fields, plan, settings, keep, pusher,
                                 [*([stop] if preemptible else []), *(callbacks or [])])  # fmt: skip
        if training_args.should_save:
            print(summary(training_args.output_dir, metrics, _head(model_args), pusher))
    return RunResult(training_args.output_dir, metrics)


def _train(model_args, data_args, training_args, model_fields, plan: RunPlan, settings: dict, keep: int | None,
           pusher: HubPusher | None, callbacks: list | None) -> dict:
    set_seed(training_args.seed)
    splits = load_splits(data_args.dataset_name, data_args.dataset_config_name, data_args.train_file,
                         data_args.validation_file, data_args.validation_fraction, training_args.seed,
                         data_args.builtin_examples, data_args.text_unit)  # fmt: skip
    if plan.text_column_from_data:
        check_text_column_of_older_run(splits["train"], data_args.text_column, training_args.output_dir)
    text_column = text_column_of(splits["train"], data_args.text_column)
    if model_args.task == "lm":
        splits, notes = drop_unusable_texts(splits, text_column, data_args.train_file or data_args.dataset_name,
                                            data_args.max_dropped_fraction)  # fmt: skip
        for note in notes if training_args.should_save else []:
            print(note)
    with training_args.main_process_first(desc="tokenizer"):
        tokenizer = load_or_train_tokenizer(model_args, TextColumn(splits["train"], text_column), plan.resume_from)
    config = build_config(model_args, model_fields, tokenizer)
    check_block_size(config, data_args.block_size)
    # `auto` trains on flex only for a learned score bias, which no split sequence carries: SDPA for the rest.
    check_context_parallel_request(config, (model_args.objective, model_args.task) == ("clm", "lm"),
                                   build_backend(model_args.attn_implementation), training_args)

    datasets_, collator, compute_metrics, preprocess = task_inputs(
        model_args, data_args, training_args, splits, text_column, tokenizer, config
    )
    # Set once the data is tokenized (whole documents exceed it), it is saved with every checkpoint and tells
    # evaluation harnesses the trained length, not the longer max_position_embeddings a recipe may allow.
    tokenizer.model_max_length = data_args.block_size
    model = build_model(model_args, config, training_args.output_dir)
    record = run_record(model_args, data_args, training_args, model, plan, settings)
    if training_args.should_save:
        write_run_record(training_args.output_dir, record)  # from now on, this command resumes this run
    trainer = trainer_class(model)(
        model=model,
        args=training_args,
        train_dataset=datasets_["train"],
        eval_dataset=datasets_["validation"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
        callbacks=[CheckpointCallback(type(config), record, keep, pusher), *(callbacks or []),
                   *([collator] if isinstance(collator, TrainerCallback) else [])],  # SeededMasking learns the epoch
    )
    metrics = {**fit(trainer, plan), "train_samples": len(datasets_["train"])}
    metrics.update(trainer.evaluate())
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.save_state()

    trainer.save_model()  # safetensors weights, config, model code, tokenizer, training_args.bin
    if training_args.should_save:
        output_dir = Path(training_args.output_dir)
        make_remote_loadable(output_dir, type(config))
        final = {**record, "global_step": trainer.state.global_step, "finished": True}
        write_run_record(output_dir, final)
        if pusher is not None:
            publish_final(output_dir, pusher, final)
    return metrics


def check_text_column_of_older_run(dataset, text_column: str, output_dir: str) -> None:
    """A run recorded with text_column unset chose its column from the data: it resumes with the text_column
    given only if that is the column it chose (`text` wherever the data has one), else it would go on
    training on another column."""
    chosen = column_chosen_by_older_versions(dataset)
    if chosen != text_column:
        chose = f"trained on its column {chosen!r}" if chosen else "found no text column"
        resume = f"Add --text_column {chosen} to resume it, or" if chosen else "Add"
        raise OutputDirError(f"output_dir {output_dir!r} holds a run started with text_column unset, which chose the "
                             f"column from the data: on this data it {chose}, not text_column={text_column!r}. "
                             f"{resume} --overwrite_output_dir true to start a new run.")  # fmt: skip


def fit(trainer: Trainer, plan: RunPlan) -> dict:
    """Train from `plan.resume_from`; returns the Trainer's train metrics. A checkpoint at the last step is
    loaded, not trained further (the Trainer would add a step to it). A run that stops before its last step
    (SIGTERM with --enable_jit_checkpoint, or a callback) raises `RunStopped`: it is not finished."""
    if plan.resume_from is not None:
        resumed = TrainerState.load_from_json(str(Path(plan.resume_from, TRAINER_STATE_NAME)))
        if _at_last_step(resumed, trainer.args):
            if is_deepspeed_zero3_enabled():  # partitioned, and the Trainer's DeepSpeed engine starts in train()
                load_into_partitioned(trainer.model, plan.resume_from)
            else:
                trainer._load_from_checkpoint(plan.resume_from)
            trainer.state = resumed
            return {}
    metrics = trainer.train(resume_from_checkpoint=plan.resume_from).metrics
    state = trainer.state
    if state.global_step < state.max_steps:
        sigterm = any(isinstance(callback, SaveAndStopOnSigterm) and callback.requested
                      for callback in trainer.callback_handler.callbacks)  # fmt: skip
        complete = [path for path in checkpoints(trainer.args.output_dir) if is_complete(path, plan.run_id)]
        resumes = f"resumes from {complete[-1]}" if complete else "starts again from step 0"
        raise RunStopped(f"Training stopped at step {state.global_step} of {state.max_steps}"
                         f"{' (SIGTERM)' if sigterm else ''}; the run is not finished. The same command {resumes}.",
                         128 + signal.SIGTERM if sigterm else 1)  # fmt: skip
    return metrics


def _at_last_step(state: TrainerState, args: TrainingArguments) -> bool:
    last = args.max_steps if args.max_steps > 0 else state.max_steps
    return 0 < last <= state.global_step


def publish_final(output_dir: Path, pusher: HubPusher, record: dict) -> None:
    """Render the card into the final model folder and push it (after the checkpoint pushes)."""
    render_model_card(output_dir, pusher.repo_id, run=record).save(output_dir / CARD_FILE)
    pusher.push_final(output_dir)


def summary(output_dir: str, metrics: dict, head, pusher: HubPusher | None) -> str:
    """What the user reads at the end: where everything is and how to load it."""
    folder = Path(output_dir)
    scores = ", ".join(f"{key} {metrics[key]:.4g}" for key in ("eval_loss", "eval_perplexity", "eval_accuracy")
                       if isinstance(metrics.get(key), float))  # fmt: skip
    lines = [
        f"Training finished: {scores}.",
        f"  model (weights, config, model code): {folder}",
        f"  tokenizer:                           {folder}",
        f"  metrics:                             {folder / ALL_RESULTS_FILE}",
        f"  run record:                          {folder / RUN_RECORD_FILE}",
    ]
    if pusher is not None:
        lines.append(f"  pushed to:                           https://huggingface.co/{pusher.repo_id}")
    lines += [
        "Load it with:",
        "  import hf_posvariants  # or pass trust_remote_code=True instead",
        f"  from transformers import {head.__name__}, AutoTokenizer",
        f"  model = {head.__name__}.from_pretrained({str(folder)!r})",
        f"  tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})",
    ]
    return "\n".join(lines)


def run_record(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, model,
               plan: RunPlan, settings: dict) -> dict:
    """What the model card and a re-run read about the run (training_args.bin has the rest, for the Trainer)."""
    return {
        "run_id": plan.run_id,
        "adopted": plan.adopted,
        "objective": model_args.objective if model_args.task == "lm" else model_args.task,
        "init": model_args.model_name_or_path,
        # The data's name and content hash, not its path: the record goes into pushed cards and files.
        **({"dataset": Path(data_args.train_file).resolve().name, "dataset_sha256": content_hash(data_args.train_file)}
           if data_args.train_file else {"dataset": data_args.dataset_name}),
        "block_size": data_args.block_size,
        "num_parameters": parameter_count(model),
        **{key: getattr(training_args, key) for key in (
            "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
            "gradient_accumulation_steps", "seed")},
        "model_args": asdict(model_args),
        "data_args": asdict(data_args),
        "settings": settings,
    }
