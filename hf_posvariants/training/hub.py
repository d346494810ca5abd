"""Model cards and uploads: render `model_cards/posvariants.md` and push an exported folder.

The upload is one `create_commit` listing every file of the folder, so a test can check the
operations against a recording stand-in for `HfApi` (the real push needs the network).
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import CommitOperationAdd, ModelCard, ModelCardData

from .. import FAMILIES

TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / "posvariants.md"
CARD_FILE = "README.md"
ARCHITECTURE_FIELDS = (
    "model_type", "position_encoding", "attention_variant", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
    "norm_type", "norm_position", "mlp_type", "hidden_act", "vocab_size",
)  # fmt: skip
TRAINING_FIELDS = ("objective", "dataset", "block_size", "learning_rate", "max_steps", "num_train_epochs",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "seed")
PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForMaskedLM": "fill-mask",
                 "AutoModelForSequenceClassification": "text-classification",
                 "AutoModelForTokenClassification": "token-classification"}  # fmt: skip
OBJECTIVE_NAMES = {"AutoModelForCausalLM": "causal language model", "AutoModelForMaskedLM": "masked language model",
                   "AutoModelForSequenceClassification": "sequence classifier",
                   "AutoModelForTokenClassification": "token classifier", "AutoModel": "base model"}  # fmt: skip


def _auto_class_of(config: dict) -> str:
    """The Auto class of the saved head, read from `architectures` against the family table."""
    architecture = (config.get("architectures") or [""])[0]
    for models in FAMILIES.values():
        for auto_class, model_class in models.items():
            if model_class.__name__ == architecture:
                return auto_class.__name__
    return "AutoModel"


def render_model_card(folder: str | Path, repo_id: str, template: str | Path = TEMPLATE) -> ModelCard:
    """A card for the exported folder, from its config.json, run_args.json and all_results.json."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    run = _read_json(folder / "run_args.json")
    results = _read_json(folder / "all_results.json")
    auto_class = _auto_class_of(config)
    dataset = run.get("dataset")
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag=PIPELINE_TAGS.get(auto_class),
        tags=[
            "hf_posvariants",
            config["model_type"],
            f"position-encoding-{config['position_encoding']}",
            f"attention-{config['attention_variant']}",
            "custom_code",
        ],
        datasets=[dataset] if dataset and dataset != "builtin" and not Path(dataset).exists() else None,
        metrics=sorted({key.split("_", 1)[1] for key in results if key.startswith("eval_")} & {"accuracy", "f1", "perplexity", "loss"})
        or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        objective_name=OBJECTIVE_NAMES[auto_class],
        auto_class=auto_class,
        position_encoding=config["position_encoding"],
        attention_variant=config["attention_variant"],
        architecture=[(key, config.get(key)) for key in ARCHITECTURE_FIELDS],
        num_parameters=f"{run['num_parameters']:,}" if "num_parameters" in run else "not recorded",
        training_summary=_training_summary(run),
        # With max_steps set, the Trainer ignores num_train_epochs: leave it out rather than mislead.
        training=[(key, run[key]) for key in TRAINING_FIELDS
                  if key in run and not (key == "num_train_epochs" and run.get("max_steps", -1) > 0)],
        results=[(key, f"{value:.4g}" if isinstance(value, float) else value) for key, value in sorted(results.items())],
    )


def _training_summary(run: dict) -> str:
    if not run:
        return "No training record was saved with this checkpoint."
    source = "the built-in position tasks (copy, reverse, key-value recall, counting)" if run.get(
        "dataset") == "builtin" else f"`{run.get('dataset')}`"
    start = f"fine-tuned from `{run['init']}`" if run.get("init") else "trained from scratch"
    return f"{start.capitalize()} with the Hugging Face Trainer (`scripts/train.py`) on {source}."


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def push_folder(folder: str | Path, repo_id: str, api, commit_message: str, private: bool | None = None,
                card: ModelCard | None = None) -> list[str]:
    """Create the repo if needed and upload every file of `folder` (plus the card) in one commit.

    Returns the uploaded paths. Optimizer and RNG states of a Trainer checkpoint go up too: they
    make the pushed checkpoint resumable, as `hub_strategy="checkpoint"` intends.
    """
    folder = Path(folder)
    if card is not None:
        card.save(folder / CARD_FILE)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
    return [operation.path_in_repo for operation in operations]
