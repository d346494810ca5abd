"""Model cards and uploads: render the package's `model_cards/posvariants.md` and push a run to the Hub.

Uploads are one `HfApi.create_commit` each, of the files an explicit allow list names (model, code,
tokenizer, card, run record, results; the Trainer's and DeepSpeed's state for resumable checkpoints), never of a folder
as a whole: other files are left out and named, and a file that looks like a secret (`.env`, `*.pem`,
`id_rsa*`, `*credentials*`, `*secret*`, `*token*`, …) stops the push. What is sent names data, never
local paths: the card and `run_args.json` carry a file's name and SHA-256 (`public_record`). A token
reaches `HfApi` only, never a file (see `pipeline.run`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from transformers.dynamic_module_utils import get_relative_import_files

from .. import FAMILIES
from .run_folder import LOCK_FILE, RUN_RECORD_FILE

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
    record = run if run is not None else read_json(folder / RUN_RECORD_FILE)
    dataset = record.get("dataset")
    # A Hub dataset id goes in the card's metadata; a local file (a SHA-256 recorded, or an old record's path) not.
    hub_dataset = (dataset not in (None, "builtin") and "dataset_sha256" not in record and not _is_local_path(dataset)
                   and not Path(dataset).exists())  # fmt: skip
    run = public_record(record)
    results = read_json(folder / "all_results.json")
    auto_class = _auto_class_of(config)
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
        datasets=[dataset] if hub_dataset else None,
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
        # The Llama export's config.json says model_type "llama"; the table says what the repository holds.
        architecture=[(key, "llama" if as_llama and key == "model_type" else config.get(key))
                      for key in ARCHITECTURE_FIELDS],
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
    if run.get("dataset_sha256"):
        source += f" (a local file or folder, SHA-256 `{run['dataset_sha256']}`)"
    start = f"fine-tuned from `{run['init']}`" if run.get("init") else "trained from scratch"
    return f"{start.capitalize()} with the Hugging Face Trainer (`scripts/train.py`) on {source}."


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} where the file is missing."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _is_local_path(value: str) -> bool:
    """A string that names a place on this machine: absolute, from the home folder, or an existing path
    with a folder in it (a Hub id such as `someone/model` is none of these)."""
    if value.startswith(("/", "~", "./", "../")) or (os.sep != "/" and os.path.isabs(value)):
        return True
    return "/" in value and Path(value).exists()


def public_record(value):
    """A run record fit to publish: every local path replaced by its last part (the file or folder name);
    a data file is known by that name and the SHA-256 the record keeps next to it."""
    if isinstance(value, dict):
        return {key: public_record(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public_record(item) for item in value]
    if isinstance(value, str) and _is_local_path(value):
        return Path(value).expanduser().name
    return value


HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
# The only files sent, and only from a folder's top: weights, config, tokenizer, card, run record, results;
# the model code is the auto_map modules and the files they import (`code_files`).
MODEL_FILES = [
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "config.json",
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", CARD_FILE, RUN_RECORD_FILE, "all_results.json",
    "train_results.json", "eval_results.json",
]  # fmt: skip
# A resumable checkpoint adds the Trainer's state (never the pickled TrainingArguments, training_args.bin).
DEEPSPEED_TAG_FILE = "latest"  # names the folder of DeepSpeed's own state, which its resume reads
TRAINER_STATE_FILES = ["optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "rng_state_*.pth",
                       "trainer_state.json", DEEPSPEED_TAG_FILE]  # fmt: skip
# DeepSpeed keeps the optimizer (and, under ZeRO-3, the weights) in that folder (`global_stepN/`), a file per rank:
# `[bf16_]zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt`, or stages 0-2's `mp_rank_00_model_states.pt`.
DEEPSPEED_STATE_FILES = ["*mp_rank_*_model_states.pt", "*mp_rank_*_optim_states.pt"]
# What a run writes for itself and never sends: not worth naming as left out.
RUN_ONLY_FILES = ["training_args.bin", "trainer_state.json", LOCK_FILE, f".{RUN_RECORD_FILE}.*"]
SECRET_PATTERNS = [".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".netrc",
                   "*credentials*", "*secret*", "*token*", "*password*"]  # fmt: skip


def code_files(folder: Path) -> list[str]:
    """The model code the folder's config.json names in `auto_map`, and the files those import."""
    config = read_json(folder / "config.json")
    modules = {reference.split(".")[0] for reference in config.get("auto_map", {}).values()}
    files = set()
    for module in modules:
        path = folder / f"{module}.py"
        if path.is_file():
            files |= {path.name, *(Path(p).name for p in get_relative_import_files(str(path)))}
    return sorted(files)


@dataclass
class PushSelection:
    """What a push sends from a folder, and the other top-level files it leaves out (but the run's own)."""

    files: list[str]
    left_out: list[str]


def matches(name: str, patterns: list[str]) -> bool:
    """Whether `name` matches one of the shell-style `patterns`."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def deepspeed_state(folder: Path) -> tuple[list[str], list[str]]:
    """A DeepSpeed checkpoint's own state folder, the one its `latest` file names: (every file in it, those
    DEEPSPEED_STATE_FILES allows), as paths under `folder`; ([], []) for a checkpoint of another kind. Warns where
    `latest` names no such state: that checkpoint, pushed, cannot resume its DeepSpeed run."""
    tag_file = folder / DEEPSPEED_TAG_FILE
    if not tag_file.is_file():
        return [], []
    tag = tag_file.read_text().strip()
    state = folder / tag
    # Only a folder directly inside: `latest` is read as data, never as a path out of the checkpoint.
    inside = state.is_dir() and state.resolve().parent == folder.resolve()
    names = sorted(p.name for p in state.iterdir() if p.is_file()) if inside else []
    files = [f"{tag}/{name}" for name in names if matches(name, DEEPSPEED_STATE_FILES)]
    if not files:
        logger.warning("%s: %s names %r, which holds no DeepSpeed state (%s): the pushed checkpoint cannot resume a "
                       "DeepSpeed (ZeRO-3) run.", folder, DEEPSPEED_TAG_FILE, tag, DEEPSPEED_STATE_FILES)  # fmt: skip
    return [f"{tag}/{name}" for name in names], files


def select_files(folder: str | Path, with_trainer_state: bool = False) -> PushSelection:
    """The folder's files on the allow list, with `with_trainer_state` those a resume reads (the Trainer's state and
    a DeepSpeed checkpoint's state folder); refuses, naming them, files that look like secrets."""
    folder = Path(folder)
    allowed = MODEL_FILES + code_files(folder) + (TRAINER_STATE_FILES if with_trainer_state else [])
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    files = [name for name in names if matches(name, allowed)]
    if with_trainer_state:
        state_names, state_files = deepspeed_state(folder)
        names, files = names + state_names, files + state_files
    secrets = [name for name in names if name not in files and matches(name.lower(), SECRET_PATTERNS)]
    if secrets:
        raise ValueError(f"refusing to push {folder}: {secrets} look like secrets (names matching "
                         f"{SECRET_PATTERNS}). Move them out of the folder; only model files are ever sent.")  # fmt: skip
    return PushSelection(files, [name for name in names if name not in files and not matches(name, RUN_ONLY_FILES)])


# Records that hold local paths (the run's data and settings; the Trainer's best_model_checkpoint).
PUBLIC_RECORDS = (RUN_RECORD_FILE, "trainer_state.json")


def push_operations(folder: str | Path, files: list[str], path_in_repo: str = "") -> list[CommitOperationAdd]:
    """One addition per file; the records go as `public_record` of them, with no local path."""
    folder, prefix = Path(folder), f"{path_in_repo}/" if path_in_repo else ""
    operations = []
    for name in files:
        content = str(folder / name)
        if name in PUBLIC_RECORDS:
            content = (json.dumps(public_record(read_json(folder / name)), indent=2) + "\n").encode()
        operations.append(CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=content))
    return operations


class HubPusher:
    """Pushes a run to one Hub repository as `hub_strategy` says, one `HfApi.create_commit` per push.

    - end: the final model folder, once;
    - every_save: also each checkpoint's model files, at the repo's top;
    - checkpoint: also the whole newest checkpoint (optimizer, scheduler, RNG states; DeepSpeed's `latest` and the
      `global_stepN/` state it names) in `last-checkpoint/`, resumable from there;
    - all_checkpoints: also every checkpoint in its own `checkpoint-N/`.
    Each push sends what `select_files` allows. Pushes during training run in the background
    (`run_as_future`); `wait` (before a checkpoint is deleted) and `push_final` wait for them.
    """

    def __init__(self, api, repo_id: str, strategy: str = "end", private: bool | None = None):
        if strategy not in HUB_STRATEGIES:
            raise ValueError(f"hub_strategy={strategy!r} is not supported; allowed values are {list(HUB_STRATEGIES)}.")
        self.api, self.repo_id, self.strategy, self.private = api, repo_id, strategy, private
        self.pending: dict[Path, list[Future]] = {}

    def check_access(self, folder: str | Path | None = None) -> None:
        """Fail before any training when the push could not happen: offline, no token, no write access,
        or a file in `folder` (the output folder) that looks like a secret."""
        if folder is not None and Path(folder).is_dir():
            select_files(folder)
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

    def _upload(self, folder: Path, message: str, path_in_repo: str, with_trainer_state: bool, background: bool):
        selection = select_files(folder, with_trainer_state)
        if selection.left_out:
            logger.info("Not pushing %s from %s: not model files", selection.left_out, folder)
        return self.api.create_commit(repo_id=self.repo_id, operations=push_operations(folder, selection.files, path_in_repo),
                                      commit_message=message, run_as_future=background)  # fmt: skip

    def push_checkpoint(self, checkpoint: Path, step: int) -> None:
        """Start the pushes of one saved checkpoint (none with hub_strategy='end')."""
        if self.strategy == "end":
            return
        message = f"Training checkpoint at step {step}"
        futures = [self._upload(checkpoint, message, "", with_trainer_state=False, background=True)]
        if self.strategy in ("checkpoint", "all_checkpoints"):
            target = "last-checkpoint" if self.strategy == "checkpoint" else checkpoint.name
            futures.append(self._upload(checkpoint, message, target, with_trainer_state=True, background=True))
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
        self._upload(folder, message, "", with_trainer_state=False, background=False)
