"""Hub pushes: what each hub_strategy sends, that a token never lands in a file, and failing before training."""

from __future__ import annotations

import hashlib
import json
import runpy
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import LocalTokenNotFoundError
from huggingface_hub.utils import get_token

from hf_posvariants.training import pipeline
from hf_posvariants.training.hub import HubPusher, public_record, select_files
from hf_posvariants.training.run_folder import damage
from tests.test_training import ROOT, _one_thread, tiny_argv  # noqa: F401  (autouse fixture)

TOKEN = "hf_DoNotLeakThisToken0123456789"
MODEL_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "run_args.json"}  # fmt: skip
TRAINER_STATE_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


class RecordingHub(HfApi):
    """huggingface_hub's own `HfApi` with the network cut out: `create_commit` records each commit's
    files and their bytes instead of sending them (in the background too, through `run_as_future`)."""

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

    def create_commit(self, repo_id, operations, *, commit_message, run_as_future=False, **kwargs):
        if run_as_future:
            return self.run_as_future(self.create_commit, repo_id, operations, commit_message=commit_message)
        files = {}
        for op in operations:
            content = op.path_or_fileobj
            files[op.path_in_repo] = content if isinstance(content, bytes) else Path(content).read_bytes()
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


def pushed_bytes(api: RecordingHub) -> dict[str, bytes]:
    return {f"{commit['message']}: {path}": data for commit in api.commits for path, data in commit["files"].items()}


def test_pushed_files_name_the_data_and_never_a_local_path(tmp_path, hub, monkeypatch):
    private = tmp_path / "home" / "alice_private"
    corpus = private / "notes.txt"
    corpus.parent.mkdir(parents=True)
    corpus.write_text("\n".join(f"line {i} of alice's notes, {i * i} words long" for i in range(800)) + "\n")
    output = private / "run"
    pipeline.main(push_argv(output, "checkpoint", "--hub_token", TOKEN, "--train_file", str(corpus),
                            "--save_total_limit", "1", "--eval_strategy", "steps", "--eval_steps", "2",
                            "--metric_for_best_model", "loss"))  # the Trainer records best_model_checkpoint
    (api,) = hub.instances
    script = runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"))
    monkeypatch.setitem(script["main"].__globals__, "HfApi", RecordingHub)
    script["main"]([str(output), "someone/again", "--token", TOKEN])
    sent = pushed_bytes(api) | pushed_bytes(hub.instances[-1])
    assert "Training checkpoint at step 4: last-checkpoint/run_args.json" in sent
    state = json.loads(sent["Training checkpoint at step 4: last-checkpoint/trainer_state.json"])
    assert state["best_model_checkpoint"] in ("checkpoint-2", "checkpoint-4")
    leaks = [name for name, data in sent.items() if b"alice_private" in data or str(tmp_path).encode() in data]
    assert not leaks
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()
    for name in ("run_args.json", "last-checkpoint/run_args.json"):
        record = json.loads(api.commits[-2 if "/" in name else -1]["files"][name])
        assert (record["dataset"], record["dataset_sha256"]) == ("notes.txt", digest)
        assert record["data_args"]["train_file"] == "notes.txt" and record["settings"]["data_args.train_file"] == "notes.txt"
    card = ModelCard(api.commits[-1]["files"]["README.md"].decode())
    assert f"`notes.txt` (a local file or folder, SHA-256 `{digest}`)" in card.content and not card.data.datasets
    # The run's own folder keeps the paths it needs to resume.
    assert json.loads((output / "run_args.json").read_text())["data_args"]["train_file"] == str(corpus)


SECRETS = [".env", "id_rsa", "server.pem", "aws_credentials.json", "hf_token.txt", "client_secret.json"]


def test_push_sends_the_allow_list_only_and_refuses_secret_looking_files(tmp_path, hub, capsys, monkeypatch):
    pipeline.main(tiny_argv(tmp_path, "clm", "posvar_llama", "--max_steps", "2", "--eval_strategy", "no"))
    script = runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"))
    monkeypatch.setitem(script["main"].__globals__, "HfApi", RecordingHub)
    for name in SECRETS:
        (tmp_path / name).write_text("s3cr3t")
    for stray in ("notes.py", "data.csv"):
        (tmp_path / stray).write_text("mine")
    with pytest.raises(ValueError, match="refusing to push") as refusal:
        script["main"]([str(tmp_path), "someone/tiny", "--token", TOKEN])
    assert all(name in str(refusal.value) for name in SECRETS) and not hub.instances
    with pytest.raises(ValueError, match="refusing to push"):  # the Llama export would leave them out, but says so
        script["main"]([str(tmp_path), "someone/tiny", "--as-llama", "--token", TOKEN])
    assert not hub.instances
    for name in SECRETS:
        (tmp_path / name).unlink()
    capsys.readouterr()
    sent = script["main"]([str(tmp_path), "someone/tiny", "--token", TOKEN])
    assert "Left out (not model files): data.csv, notes.py" in capsys.readouterr().out
    assert set(sent) == set(hub.instances[-1].commits[0]["files"])
    assert {"tokenizer.json", "tokenizer_config.json", "modeling_posvariants.py"} <= set(sent)
    assert not {"notes.py", "data.csv", "training_args.bin"} & set(sent)

    # The Trainer's pushes refuse too, before any training.
    run = tmp_path / "next"
    run.mkdir()
    (run / ".env").write_text("HF_TOKEN=" + TOKEN)
    with pytest.raises(ValueError, match=r"refusing to push .*\['\.env'\]"):
        pipeline.main(push_argv(run, "end", "--hub_token", TOKEN))
    assert sorted(p.name for p in run.iterdir()) == [".env"]


def test_public_record_keeps_hub_ids_and_names_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "base").mkdir(parents=True)
    record = {"init": "runs/base", "tokenizer": "someone/tokenizer", "files": ["/home/alice/data.txt", "~/x.json"],
              "text_column": "text", "steps": 4, "note": None}  # fmt: skip
    assert public_record(record) == {"init": "base", "tokenizer": "someone/tokenizer", "files": ["data.txt", "x.json"],
                                     "text_column": "text", "steps": 4, "note": None}  # fmt: skip


def test_pushing_a_checkpoint_elsewhere_leaves_it_as_sealed(tmp_path, hub, monkeypatch):
    """A run pushed while training sealed its checkpoints with their card; the push script sends a checkpoint to
    another repository (another card) without touching the folder, so resuming still takes it."""
    argv = push_argv(tmp_path, "every_save", "--hub_token", TOKEN, "--save_total_limit", "3")
    pipeline.main(argv)
    checkpoint = tmp_path / "checkpoint-4"
    before = {path.name: path.read_bytes() for path in checkpoint.iterdir() if path.is_file()}
    script = runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"))
    monkeypatch.setitem(script["main"].__globals__, "HfApi", RecordingHub)
    sent = script["main"]([str(checkpoint), "someone-else/a-longer-repository-name", "--token", TOKEN])
    card = hub.instances[-1].commits[0]["files"]["README.md"].decode()
    assert "someone-else/a-longer-repository-name" in card and "README.md" in sent
    assert {path.name: path.read_bytes() for path in checkpoint.iterdir() if path.is_file()} == before
    assert damage(checkpoint) is None  # what resuming verifies before it takes a checkpoint


def deepspeed_checkpoint(folder: Path, step: int) -> Path:
    """The layout a 2-rank ZeRO-3 run's Trainer saves (tests/test_deepspeed.py's slow test checks the real one): model
    files and the Trainer's state at the top, DeepSpeed's partitions in `global_stepN/`, named by `latest`; here a
    stale older state folder and stray files beside them too."""
    for name in ("config.json", "model.safetensors", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth",
                 "zero_to_fp32.py", "training_args.bin"):  # fmt: skip
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}" if name.endswith(".json") else name)
    (folder / "latest").write_text(f"global_step{step}")
    for tag in (f"global_step{step}", "global_step1"):
        (folder / tag).mkdir()
        for rank in (0, 1):
            for kind in ("model", "optim"):
                (folder / tag / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt").write_text(f"{tag} {rank} {kind}")
    (folder / f"global_step{step}" / "notes.txt").write_text("mine")
    return folder


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_a_deepspeed_checkpoint_pushed_to_resume_carries_deepspeeds_state(tmp_path, strategy):
    """The strategies that push a checkpoint to resume from send what DeepSpeed's resume reads: `latest` and the
    rank files of the state folder it names, still through the allow list; the model-only push leaves them out."""
    checkpoint = deepspeed_checkpoint(tmp_path / "checkpoint-4", 4)
    api = RecordingHub()
    pusher = HubPusher(api, "someone/tiny", strategy)
    pusher.push_checkpoint(checkpoint, 4)
    pusher.wait(checkpoint)
    model_only, resumable = (set(commit["files"]) for commit in api.commits)
    assert model_only == {"config.json", "model.safetensors"}
    folder = "last-checkpoint" if strategy == "checkpoint" else "checkpoint-4"
    state = {f"global_step4/zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1)
             for kind in ("model", "optim")}  # fmt: skip
    assert resumable == {f"{folder}/{name}" for name in {"config.json", "model.safetensors", "trainer_state.json",
                                                         "rng_state_0.pth", "rng_state_1.pth", "latest", *state}}
    assert api.commits[1]["files"][f"{folder}/global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"] == \
        b"global_step4 1 optim"
    assert select_files(checkpoint, with_trainer_state=True).left_out == ["zero_to_fp32.py", "global_step4/notes.txt"]


def test_a_deepspeed_state_folder_is_read_through_the_allow_list_only(tmp_path, caplog):
    """A secret-looking file in the state folder stops the push; a `latest` naming no state (or a path out of the
    checkpoint) sends none and says the pushed checkpoint cannot resume the run."""
    checkpoint = deepspeed_checkpoint(tmp_path / "checkpoint-4", 4)
    (checkpoint / "global_step4" / "hf_token.txt").write_text(TOKEN)
    with pytest.raises(ValueError, match=r"refusing to push .*\['global_step4/hf_token\.txt'\]"):
        select_files(checkpoint, with_trainer_state=True)
    (checkpoint / "global_step4" / "hf_token.txt").unlink()
    for tag in ("global_step9", "..", str(tmp_path)):
        (checkpoint / "latest").write_text(tag)
        caplog.clear()
        files = select_files(checkpoint, with_trainer_state=True).files
        assert not [name for name in files if "/" in name], tag
        assert f"names {tag!r}, which holds no DeepSpeed state" in caplog.text
        assert "the pushed checkpoint cannot resume a DeepSpeed (ZeRO-3) run" in caplog.text
