"""Model cards and uploads: render the package's `model_cards/posvariants.md` and push a run to the Hub.

Uploads go through `HfApi.upload_folder` with allow/ignore patterns, so huggingface_hub itself picks
the files; a token reaches `HfApi` only, never a file (see `pipeline.run`).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from .. import FAMILIES

logger = logging.getLogger(__name__)

# Package data, so it is there in a wheel install as in a checkout.
TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "posvariants.md"
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


def render_model_card(
    folder: str | Path, repo_id: str, template: str | Path = TEMPLATE, run: dict | None = None, as_llama: bool = False
) -> ModelCard:
    """A card for the exported folder, from its config.json, run record (`run`, else run_args.json) and
    all_results.json; `as_llama`: for the folder's export as a plain `LlamaForCausalLM` (no remote code)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    run = run if run is not None else _read_json(folder / "run_args.json")
    results = _read_json(folder / "all_results.json")
    auto_class = _auto_class_of(config)
    dataset = run.get("dataset")
    code_tags = ["llama"] if as_llama else ["custom_code"]
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag=PIPELINE_TAGS.get(auto_class),
        tags=[
            "hf_posvariants",
            config["model_type"],
            f"position-encoding-{config['position_encoding']}",
            f"attention-{config['attention_variant']}",
            *code_tags,
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
        as_llama=as_llama,
        trained_length=run.get("block_size") if auto_class == "AutoModelForCausalLM" else None,
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


HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
# A model folder on the Hub: weights, config, the flat model code, tokenizer, card and the run's records.
MODEL_FILE_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "*.py",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.*",
    "merges.txt", "*.model", "chat_template.*", CARD_FILE, "run_args.json", "*results.json",
]  # fmt: skip
# Files at the folder's top only: checkpoints and logs live in subfolders.
ROOT_ONLY = ["*/*"]
# A resumable checkpoint is everything the Trainer wrote but the pickled TrainingArguments.
CHECKPOINT_IGNORE = ["training_args.bin", "*/*"]


def files_to_push(folder: str | Path, allow_patterns: list[str] | None, ignore_patterns: list[str]) -> list[str]:
    """The files `HfApi.upload_folder` sends with these patterns (its own filter, for dry runs)."""
    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    ignore = ignore_patterns + DEFAULT_IGNORE_PATTERNS
    return list(filter_repo_objects(paths, allow_patterns=allow_patterns, ignore_patterns=ignore))


class HubPusher:
    """Pushes a run to one Hub repository as `hub_strategy` says, through `HfApi.upload_folder`.

    - end: the final model folder, once;
    - every_save: also each checkpoint's model files, at the repo's top;
    - checkpoint: also the whole newest checkpoint (optimizer, scheduler, RNG states) in `last-checkpoint/`;
    - all_checkpoints: also every checkpoint in its own `checkpoint-N/`.
    Pushes during training run in the background (`run_as_future`); `wait` (before a checkpoint is
    deleted) and `push_final` wait for them.
    """

    def __init__(self, api, repo_id: str, strategy: str = "end", private: bool | None = None):
        if strategy not in HUB_STRATEGIES:
            raise ValueError(f"hub_strategy={strategy!r} is not supported; allowed values are {list(HUB_STRATEGIES)}.")
        self.api, self.repo_id, self.strategy, self.private = api, repo_id, strategy, private
        self.pending: dict[Path, list[Future]] = {}

    def check_access(self) -> None:
        """Fail before any training when the push could not happen: offline, no token, or no write access."""
        if constants.is_offline_mode():
            raise ValueError(
                "push_to_hub=True needs the Hub, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub."
            )
        try:
            user = self.api.whoami()
            self.api.create_repo(repo_id=self.repo_id, private=self.private, exist_ok=True)
        except LocalTokenNotFoundError:
            raise ValueError("push_to_hub=True needs a Hub token: run `hf auth login`, set HF_TOKEN, or pass "
                             "--hub_token (it is used, never saved).") from None
        except (HfHubHTTPError, OSError) as error:
            raise ValueError(
                f"push_to_hub=True: cannot create or reach the Hub repository {self.repo_id!r}: {error}"
            ) from None
        logger.info("Pushing to https://huggingface.co/%s as %s (hub_strategy=%s)", self.repo_id, user.get("name"),
                    self.strategy)  # fmt: skip

    def _upload(self, folder: Path, message: str, path_in_repo: str, allow, ignore, background: bool):
        return self.api.upload_folder(repo_id=self.repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                                      commit_message=message, allow_patterns=allow, ignore_patterns=list(ignore),
                                      run_as_future=background)  # fmt: skip

    def push_checkpoint(self, checkpoint: Path, step: int) -> None:
        """Start the pushes of one saved checkpoint (none with hub_strategy='end')."""
        if self.strategy == "end":
            return
        message = f"Training checkpoint at step {step}"
        futures = [self._upload(checkpoint, message, "", MODEL_FILE_PATTERNS, ROOT_ONLY, background=True)]
        if self.strategy in ("checkpoint", "all_checkpoints"):
            target = "last-checkpoint" if self.strategy == "checkpoint" else checkpoint.name
            futures.append(self._upload(checkpoint, message, target, None, CHECKPOINT_IGNORE, background=True))
        self.pending[checkpoint] = futures

    def wait(self, checkpoint: Path) -> None:
        """Wait for the pushes of a checkpoint (before it is deleted); a failed one is logged, not raised."""
        for future in self.pending.pop(checkpoint, []):
            error = future.exception()
            if error is not None:
                logger.warning("Pushing %s to %s failed: %s", checkpoint, self.repo_id, error)

    def push_final(self, folder: Path, message: str = "Trained model") -> None:
        """Wait for the checkpoint pushes, then push the final model folder and wait for it."""
        for checkpoint in list(self.pending):
            self.wait(checkpoint)
        self._upload(folder, message, "", MODEL_FILE_PATTERNS, ROOT_ONLY, background=False)
