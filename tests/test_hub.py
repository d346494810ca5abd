"""Hub pushes: what each hub_strategy sends, that a token never lands in a file, and failing before training."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import LocalTokenNotFoundError
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import get_token

from hf_posvariants.training import pipeline
from tests.test_training import ROOT, _one_thread, tiny_argv  # noqa: F401  (autouse fixture)

TOKEN = "hf_DoNotLeakThisToken0123456789"
MODEL_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "run_args.json"}  # fmt: skip
TRAINER_STATE_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


class RecordingHub(HfApi):
    """huggingface_hub's own `HfApi` with the network cut out: `upload_folder` runs huggingface_hub's
    file selection (`_prepare_upload_folder_additions` with the default ignore patterns, as upload_folder
    does) and records each commit's files and their bytes instead of sending them."""

    instances: list[RecordingHub] = []

    def __init__(self, token=None, **kwargs):
        super().__init__(token=token, **kwargs)
        self.repos, self.commits = [], []
        RecordingHub.instances.append(self)

    def resolved_token(self) -> str | None:
        return self.token or get_token()

    def whoami(self, token=None, **kwargs):
        if not self.resolved_token():
            raise LocalTokenNotFoundError("no token")
        return {"name": "someone"}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        self.repos.append(repo_id)

    def _validate_yaml(self, content, **kwargs):
        yaml.safe_load(content.split("---")[1])

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, allow_patterns=None,
                      ignore_patterns=None, run_as_future=False, **kwargs):  # fmt: skip
        if run_as_future:
            return self.run_as_future(self.upload_folder, repo_id=repo_id, folder_path=folder_path,
                                      path_in_repo=path_in_repo, commit_message=commit_message,
                                      allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)  # fmt: skip
        operations = self._prepare_upload_folder_additions(
            folder_path, path_in_repo or "", allow_patterns, list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS
        )
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.commits.append({"repo": repo_id, "message": commit_message, "files": files})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The pipeline's HfApi replaced by RecordingHub, the Hub 'online', and no token anywhere yet."""
    RecordingHub.instances.clear()
    monkeypatch.setattr(pipeline, "HfApi", RecordingHub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_login" / "stored_tokens"))
    return RecordingHub


def push_argv(output_dir: Path, strategy: str, *extra: str) -> list[str]:
    return tiny_argv(output_dir, "clm", "posvar_llama", "--max_steps", "4", "--save_steps", "2",
                     "--eval_strategy", "no",
                     "--push_to_hub", "true", "--hub_model_id", "someone/tiny-posvar", "--hub_strategy", strategy,
                     *extra)  # fmt: skip


@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_each_hub_strategy_pushes_what_it_means(tmp_path, hub, strategy):
    pipeline.main(push_argv(tmp_path, strategy, "--save_total_limit", "1", "--hub_token", TOKEN))
    (api,) = hub.instances
    assert api.repos == ["someone/tiny-posvar"]
    code = {p.name for p in tmp_path.glob("*.py")}
    assert {"modeling_posvariants.py", "configuration_posvariants.py"} <= code
    model = MODEL_FILES | code
    # Checkpoint folders hold the model files and the Trainer's state, never the pickled TrainingArguments.
    checkpoint = model | TRAINER_STATE_FILES

    expected = []
    for step in (2, 4):
        if strategy != "end":
            expected.append((f"Training checkpoint at step {step}", {path: path for path in model}))
        if strategy in ("checkpoint", "all_checkpoints"):
            folder = "last-checkpoint" if strategy == "checkpoint" else f"checkpoint-{step}"
            expected.append((f"Training checkpoint at step {step}", {f"{folder}/{path}": path for path in checkpoint}))
    expected.append(("Trained model", {path: path for path in model | {"all_results.json"}}))
    assert [(c["message"], set(c["files"])) for c in api.commits] == [(m, set(files)) for m, files in expected]
    for commit in api.commits:
        assert not {"training_args.bin", ".posvar.lock"} & {Path(p).name for p in commit["files"]}
        assert all(Path(p).name not in TRAINER_STATE_FILES for p in commit["files"] if "/" not in p)
        card = ModelCard(commit["files"]["README.md" if "README.md" in commit["files"] else next(
            p for p in commit["files"] if p.endswith("/README.md"))].decode())
        assert {"position-encoding-rope", "posvar_llama", "custom_code"} <= set(card.data.tags)
    final_card = ModelCard(api.commits[-1]["files"]["README.md"].decode())
    assert final_card.data.pipeline_tag == "text-generation" and "trust_remote_code=True" in final_card.content
    assert {"perplexity", "accuracy"} <= set(final_card.data.metrics)


def all_bytes(folder: Path) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize("way", ["flag", "recipe", "environment", "login"])
def test_a_token_never_lands_in_a_file_or_a_push(tmp_path, hub, monkeypatch, way):
    output = tmp_path / "run"
    extra = []
    if way == "flag":
        extra = ["--hub_token", TOKEN]
    elif way == "recipe":
        recipe = yaml.safe_load((ROOT / "configs" / "tiny_clm.yaml").read_text()) | {"hub_token": TOKEN}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    elif way == "environment":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True)
        Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    argv = push_argv(output, "all_checkpoints", *extra)
    if way == "recipe":
        argv[0] = str(tmp_path / "recipe.yaml")
    pipeline.main(argv)
    (api,) = hub.instances
    assert api.resolved_token() == TOKEN  # the token reached the Hub client …
    secret = TOKEN.encode()
    leaks = [path for path, data in all_bytes(output) if secret in data]
    leaks += [path for commit in api.commits for path, data in commit["files"].items() if secret in data]
    assert not leaks  # … and nothing else: no file written, none pushed

    script = runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"))
    monkeypatch.setitem(script["main"].__globals__, "HfApi", RecordingHub)
    script["main"]([str(output), "someone/again", "--token", TOKEN])
    assert hub.instances[-1].token == TOKEN
    assert not [path for path, data in all_bytes(output) if secret in data]
    assert not [path for path, data in hub.instances[-1].commits[0]["files"].items() if secret in data]


def test_push_fails_before_training_offline_or_without_a_token(tmp_path, hub, monkeypatch):
    argv = push_argv(tmp_path, "every_save")
    monkeypatch.setattr(pipeline, "HfApi", HfApi)  # the real client: no token is found, no request is sent
    with pytest.raises(ValueError, match="needs a Hub token"):
        pipeline.main(argv)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        pipeline.main([*argv, "--hub_token", TOKEN])
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_push_script_dry_run_lists_exactly_what_a_push_sends(tmp_path, hub, capsys, monkeypatch):
    pipeline.main(tiny_argv(tmp_path, "clm", "posvar_llama", "--max_steps", "2", "--eval_strategy", "no"))
    before = {p.name for p in tmp_path.iterdir()}
    script = runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"))
    monkeypatch.setitem(script["main"].__globals__, "HfApi", RecordingHub)
    listed = script["main"]([str(tmp_path), "someone/tiny", "--dry_run"])
    out = capsys.readouterr().out
    assert not hub.instances and {p.name for p in tmp_path.iterdir()} == before  # no client, no file written
    assert all(name in out for name in listed) and "someone/tiny" in out
    sent = script["main"]([str(tmp_path), "someone/tiny", "--token", TOKEN])
    assert sorted(listed) == sorted(sent) == sorted(hub.instances[0].commits[0]["files"])
    assert MODEL_FILES | {"all_results.json"} <= set(sent) and not any("checkpoint" in path for path in sent)


def test_a_finished_run_is_pushed_by_the_same_command_with_push_added(tmp_path, hub, capsys):
    argv = tiny_argv(tmp_path, "clm", "posvar_llama", "--max_steps", "2", "--eval_strategy", "no")
    pipeline.main(argv)
    pipeline.main([*argv, "--push_to_hub", "true", "--hub_model_id", "someone/later", "--hub_token", TOKEN])
    assert "has already finished" in capsys.readouterr().out
    (api,) = hub.instances
    assert [c["message"] for c in api.commits] == ["Trained model"]
    assert MODEL_FILES | {"all_results.json"} <= set(api.commits[0]["files"])
