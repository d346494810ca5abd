"""The training pipeline behind `scripts/train.py`, in the manner of transformers' run_clm/run_mlm.

    recipe (YAML) + command line → HfArgumentParser(ModelArguments, DataArguments, TrainingArguments)
    → data splits → tokenizer (loaded, or trained on the data) → blocks (datasets.map)
    → model (from the recipe's `model:` fields, or from a checkpoint) → Trainer → export + metrics.

Every check that can fail on the user's input runs before the Trainer is built.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import evaluate
import torch
import torch.nn.functional as F
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
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from ..configuration_posvariants import PosVarConfig
from ..lm_loss import LM_LOSSES
from . import fused_loss  # noqa: F401  (registers lm_loss="liger" where liger-kernel is installed)
from .data import IGNORE_INDEX, load_splits, pack_blocks, text_column_of
from .export import RemoteCodeCheckpointCallback, make_remote_loadable, write_run_record
from .hub import push_folder, render_model_card
from .metrics import POSVAR_ACCURACY
from .recipes import check_config_fields, parse_recipe
from .tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

OBJECTIVES = ("clm", "mlm")
TASKS = ("lm", "sequence_classification")
LAST = "last"


@dataclass
class ModelArguments:
    """Which model to train: a family config built from the recipe's `model:` fields, or a checkpoint."""

    model_type: str = field(default="posvar_llama", metadata={"help": "Family config for training from scratch."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Checkpoint (folder or Hub id) to fine-tune."})
    objective: str = field(default="clm", metadata={"help": f"Language-modelling objective: {OBJECTIVES}."})
    task: str = field(default="lm", metadata={"help": f"What to train: {TASKS}."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder or Hub id; else trained."})
    tokenizer_vocab_size: int = field(default=1000, metadata={"help": "Vocabulary of a tokenizer trained here."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flex_attention, …"})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow checkpoints that ship model code."})
    torch_num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for torch; 1 is fastest for tiny models (measured 20x on 2 cores)."}
    )
    lm_loss: str = field(
        default="plain",
        metadata={"help": "Causal-LM training loss: plain, chunked (no full fp32 logits), liger (fused; GPU, liger-kernel)."},
    )


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut; the built-in position tasks by default."""

    dataset_name: str | None = field(default="builtin", metadata={"help": "'builtin' or a `datasets` Hub name."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config of the Hub dataset."})
    train_file: str | None = field(default=None, metadata={"help": "Text/JSON lines/CSV file or folder."})
    validation_file: str | None = field(default=None, metadata={"help": "Like train_file; else held out."})
    text_column: str | None = field(default=None, metadata={"help": "Text column; default 'text' or the first."})
    label_column: str = field(default="label", metadata={"help": "Label column for sequence classification."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Held out when there is no validation split."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training block (max length for tasks)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens masked for objective mlm."})
    builtin_examples: int = field(default=2000, metadata={"help": "Number of built-in task lines."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for datasets.map."})


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
    """The tokenizer named by the recipe, else the checkpoint's, else one trained on `texts`."""
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


def resume_folder(training_args: TrainingArguments) -> str | None:
    """`resume_from_checkpoint: last` means the newest checkpoint in output_dir; refuse when there is none."""
    requested = training_args.resume_from_checkpoint
    if requested is None:
        return None
    folder = get_last_checkpoint(training_args.output_dir) if requested == LAST else requested
    if folder is None or not Path(folder).is_dir():
        raise ValueError(f"resume_from_checkpoint={requested!r}: no checkpoint found (output_dir={training_args.output_dir!r}).")
    return folder


def parse(argv: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    (model_args, data_args, training_args), model_fields = parse_recipe(parser, argv)
    _choice("objective", model_args.objective, OBJECTIVES)
    _choice("task", model_args.task, TASKS)
    if model_args.lm_loss != "plain" and (model_args.objective, model_args.task) != ("clm", "lm"):
        raise ValueError(f"lm_loss={model_args.lm_loss!r} applies to objective='clm', task='lm'; allowed value "
                         "for other objectives and tasks is 'plain'.")
    _choice("lm_loss", model_args.lm_loss, ["plain", *LM_LOSSES])
    if model_args.task == "sequence_classification" and model_args.model_name_or_path is None:
        raise ValueError("task='sequence_classification' fine-tunes a checkpoint: set model_name_or_path.")
    return model_args, data_args, training_args, model_fields


def task_inputs(model_args, data_args, training_args, splits, text_column, tokenizer, config):
    """(datasets, collator, compute_metrics, preprocess_logits_for_metrics) of the task; sets the labels in `config`."""
    metric = evaluate.load(POSVAR_ACCURACY)
    if model_args.task == "sequence_classification":
        datasets_, id2label = classification_splits(splits, tokenizer, data_args)
        config.id2label, config.label2id = id2label, {label: i for i, label in id2label.items()}
        return datasets_, DataCollatorWithPadding(tokenizer), classification_metrics(metric), None
    if model_args.objective == "mlm" and tokenizer.mask_token is None:
        raise ValueError(f"objective='mlm' needs a tokenizer with a mask token; {type(tokenizer).__name__} has none.")
    with training_args.main_process_first(desc="packing"):
        datasets_ = pack_blocks(splits, tokenizer, text_column, data_args.block_size, data_args.preprocessing_num_workers)
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm=model_args.objective == "mlm", mlm_probability=data_args.mlm_probability
    )
    return datasets_, collator, lm_metrics(metric), lm_eval_outputs(model_args.objective)


def build_model(model_args: ModelArguments, config: PosVarConfig):
    """The task head, fresh from `config` or with the checkpoint's weights."""
    head = _head(model_args)
    if model_args.model_name_or_path is None:
        model = head.from_config(config, attn_implementation=model_args.attn_implementation)
    else:
        model = head.from_pretrained(model_args.model_name_or_path, config=config,
                                     trust_remote_code=model_args.trust_remote_code,
                                     attn_implementation=model_args.attn_implementation)
    if model_args.lm_loss != "plain":
        model.use_lm_loss(model_args.lm_loss)
    return model


def hub_publisher(training_args: TrainingArguments, hub_client=None):
    """A function pushing a folder (with its rendered card) to `hub_model_id`, or the output folder's name."""
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    if hub_client is None:
        from huggingface_hub import HfApi

        hub_client = HfApi(token=training_args.hub_token)

    def publish(folder, message):
        card = render_model_card(folder, repo_id)
        push_folder(folder, repo_id, hub_client, message, private=training_args.hub_private_repo, card=card)

    return publish


def main(argv: list[str], callbacks: list | None = None, hub_client=None) -> dict:
    """Run a recipe; returns the final metrics. `hub_client` stands in for `huggingface_hub.HfApi`."""
    model_args, data_args, training_args, model_fields = parse(argv)
    # Every parameter of our models takes part in every step, so DDP need not search for unused ones.
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False
    # Pushing is ours (push_to_hub=True in TrainingArguments contacts the Hub as the Trainer is built,
    # and its intermediate pushes leave out the model code).
    push, training_args.push_to_hub = training_args.push_to_hub, False
    if model_args.torch_num_threads is not None:
        torch.set_num_threads(model_args.torch_num_threads)
    set_seed(training_args.seed)

    checkpoint = resume_folder(training_args)
    splits = load_splits(data_args.dataset_name, data_args.dataset_config_name, data_args.train_file,
                         data_args.validation_file, data_args.validation_fraction, training_args.seed,
                         data_args.builtin_examples)
    text_column = text_column_of(splits["train"], data_args.text_column)
    with training_args.main_process_first(desc="tokenizer"):
        tokenizer = load_or_train_tokenizer(model_args, splits["train"][text_column], checkpoint)
    config = build_config(model_args, model_fields, tokenizer)
    check_block_size(config, data_args.block_size)

    datasets_, collator, compute_metrics, preprocess = task_inputs(
        model_args, data_args, training_args, splits, text_column, tokenizer, config
    )
    model = build_model(model_args, config)
    publish = hub_publisher(training_args, hub_client) if push else None
    every_save = publish is not None and training_args.hub_strategy != "end"
    record = run_record(model_args, data_args, training_args, model)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=datasets_["train"],
        eval_dataset=datasets_["validation"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
        callbacks=[RemoteCodeCheckpointCallback(type(config), record, publish if every_save else None), *(callbacks or [])],
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {**train_result.metrics, "train_samples": len(datasets_["train"])}
    metrics.update(trainer.evaluate())
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.save_state()

    trainer.save_model()  # safetensors weights, config, model code, tokenizer, training_args.bin
    if trainer.is_world_process_zero():
        make_remote_loadable(training_args.output_dir, type(config))
        write_run_record(training_args.output_dir, record)
        if publish is not None:
            publish(training_args.output_dir, "Trained model")
    return metrics


def run_record(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, model) -> dict:
    """What the model card reports about the run (training_args.bin has the rest, for the Trainer)."""
    return {
        "objective": model_args.objective if model_args.task == "lm" else model_args.task,
        "init": model_args.model_name_or_path,
        "dataset": data_args.train_file or data_args.dataset_name,
        "block_size": data_args.block_size,
        "num_parameters": model.num_parameters(),
        **{key: getattr(training_args, key) for key in (
            "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
            "gradient_accumulation_steps", "seed")},
        "model_args": asdict(model_args),
        "data_args": asdict(data_args),
    }
