"""A run's output folder: kill -9 during a save then the same command, SIGTERM with --enable_jit_checkpoint,
resume (damaged and model-only checkpoints, plain Trainer folders), refusal, the lock, rotation."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_posvariants.training import pipeline
from hf_posvariants.training.run_folder import (
    LOCK_FILE,
    OutputDirError,
    RunLock,
    damage,
    is_complete,
    prepare,
    rotate,
    seal_checkpoint,
)
from tests.conftest import TORCHRUN
from tests.test_training import ROOT, _one_thread, tiny_argv  # noqa: F401  (autouse fixture)

CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_argv(output_dir: Path, *extra: str) -> list[str]:
    """12 steps, a checkpoint every 4, no evaluation during training: a few seconds."""
    return tiny_argv(output_dir, "clm", "posvar_llama", "--max_steps", "12", "--save_steps", "4",
                     "--eval_strategy", "no", "--save_total_limit", "5", "--logging_steps", "4", *extra)  # fmt: skip


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file's hash, but the lock's (it names the process holding it)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}  # fmt: skip


def assert_same_weights(folder: Path, reference: Path, names=("model.safetensors",)) -> None:
    for name in names:
        got, expected = load_file(folder / name), load_file(reference / name)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    torch.set_num_threads(1)
    pipeline.main(run_argv(folder))
    return folder


# A child that SIGKILLs itself before or after one function of the save at step 8 (saves: 4, 8, 12).
KILL_DURING_SAVE = """
import json, os, signal, sys
from transformers import Trainer
from hf_posvariants.training import pipeline

name, when, step, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
owner = Trainer if hasattr(Trainer, name) else pipeline
original = getattr(owner, name)

def killing(*args, **kwargs):
    # Trainer methods know the step from the trainer; seal_checkpoint(folder, record, step) is told it.
    current = args[0].state.global_step if owner is Trainer else args[2]
    if current == step and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if current == step and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, name, killing)
pipeline.main(argv)
"""

# (function, before/after it, what checkpoint-8 is then, the checkpoint the same command resumes from)
KILL_POINTS = {
    "before the save": ("_save_checkpoint", "before", None, "checkpoint-4"),
    "after the weights": ("save_model", "after", "incomplete", "checkpoint-4"),
    "after the optimizer": ("_save_rng_state", "before", "incomplete", "checkpoint-4"),
    "after every Trainer file": ("seal_checkpoint", "before", "incomplete", "checkpoint-4"),
    "after the seal": ("seal_checkpoint", "after", "complete", "checkpoint-8"),
}
DEFAULT_SUITE = {"after every Trainer file", "after the seal"}  # the others are slow: ~10 s each


@pytest.mark.parametrize(
    "point", [p if p in DEFAULT_SUITE else pytest.param(p, marks=pytest.mark.slow) for p in KILL_POINTS]
)
def test_kill_during_save_then_same_command_matches_uninterrupted_run(tmp_path, point, uninterrupted, capsys):
    name, when, state_of_8, resumed_from = KILL_POINTS[point]
    argv = run_argv(tmp_path)
    child = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, name, when, "8", json.dumps(argv)],
                           env=CHILD_ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert is_complete(tmp_path / "checkpoint-4")
    checkpoint_8 = tmp_path / "checkpoint-8"
    assert {None: not checkpoint_8.exists(), "incomplete": checkpoint_8.is_dir() and not is_complete(checkpoint_8),
            "complete": is_complete(checkpoint_8)}[state_of_8]  # fmt: skip

    capsys.readouterr()
    pipeline.main(argv)  # the same command, nothing added
    out = capsys.readouterr().out
    assert f"Resuming from {tmp_path / resumed_from} " in out
    if state_of_8 == "incomplete":
        assert "Skipping checkpoint-8: not a complete checkpoint of this run" in out
    assert_same_weights(tmp_path, uninterrupted)
    assert_same_weights(tmp_path / "checkpoint-12", uninterrupted / "checkpoint-12")
    resumed = torch.load(tmp_path / "checkpoint-12" / "optimizer.pt", weights_only=True)["state"]
    reference = torch.load(uninterrupted / "checkpoint-12" / "optimizer.pt", weights_only=True)["state"]
    for index, moments in reference.items():
        for key, value in moments.items():
            torch.testing.assert_close(resumed[index][key], value, rtol=0, atol=0)


class CrashAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"crash at step {self.step}")


def test_same_command_resumes_and_deletes_nothing_it_did_not_write(tmp_path, uninterrupted, capsys):
    argv = run_argv(tmp_path, "--save_total_limit", "1")
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(argv, callbacks=[CrashAt(6)])
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-4"]
    # What the user puts there: a hand-made checkpoint folder and notes.
    (tmp_path / "checkpoint-999").mkdir()
    (tmp_path / "checkpoint-999" / "mine.txt").write_text("keep me")
    (tmp_path / "notes.txt").write_text("my notes")

    capsys.readouterr()
    pipeline.main(argv)
    out = capsys.readouterr().out
    assert f"Resuming from {tmp_path / 'checkpoint-4'} " in out
    assert "Skipping checkpoint-999" in out
    assert (tmp_path / "checkpoint-999" / "mine.txt").read_text() == "keep me"
    assert (tmp_path / "notes.txt").read_text() == "my notes"
    # save_total_limit=1 rotated this run's own checkpoints only.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-999"]
    assert_same_weights(tmp_path, uninterrupted)

    # Once finished, the same command trains nothing and changes nothing.
    before = folder_digest(tmp_path)
    metrics = pipeline.main(argv)
    assert "has already finished" in capsys.readouterr().out
    assert metrics == json.loads((tmp_path / "all_results.json").read_text())
    assert folder_digest(tmp_path) == before


def test_another_runs_folder_is_refused_unless_overwritten(tmp_path, capsys):
    first = tiny_argv(tmp_path, "clm", "posvar_llama", "--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no")
    pipeline.main(first)
    before = folder_digest(tmp_path)
    with pytest.raises(OutputDirError, match=r"learning_rate: 0\.003 → 0\.001") as refusal:
        pipeline.main([*first, "--learning_rate", "0.001"])
    assert str(tmp_path) in str(refusal.value) and "--overwrite_output_dir" in str(refusal.value)
    assert "--resume_from_checkpoint last to continue it" in str(refusal.value)  # it has checkpoints to continue
    assert folder_digest(tmp_path) == before

    # A folder with files but no run record (someone else's) is refused too.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_text("not ours")
    with pytest.raises(OutputDirError, match="holds no run record"):
        pipeline.main(tiny_argv(foreign, "clm", "posvar_llama", "--max_steps", "2"))
    assert (foreign / "model.safetensors").read_text() == "not ours" and not (foreign / "run_args.json").exists()

    # --overwrite_output_dir starts a new run; files it does not write (the old checkpoints) stay.
    old_checkpoints = {name: digest for name, digest in before.items() if name.startswith("checkpoint-")}
    pipeline.main([*first, "--learning_rate", "0.001", "--max_steps", "1", "--overwrite_output_dir", "true"])
    assert "Overwriting output_dir" in capsys.readouterr().out
    after = folder_digest(tmp_path)
    assert {name: after.get(name) for name in old_checkpoints} == old_checkpoints
    assert json.loads((tmp_path / "run_args.json").read_text())["settings"]["training_args.learning_rate"] == 0.001


# Trains until step 1, says so in a file, and waits for the parent's go-ahead file.
HOLD_AT_STEP_ONE = """
import json, sys, time
from pathlib import Path
from transformers import TrainerCallback
from hf_posvariants.training import pipeline

class Hold(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            Path(sys.argv[1], "at_step_1").write_text("")
            while not Path(sys.argv[1], "go").exists():
                time.sleep(0.05)

pipeline.main(json.loads(sys.argv[2]), callbacks=[Hold()])
"""


def test_a_concurrent_run_on_the_same_folder_fails_at_once(tmp_path):
    folder, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    argv = tiny_argv(folder, "clm", "posvar_llama", "--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no")
    child = subprocess.Popen([sys.executable, "-c", HOLD_AT_STEP_ONE, str(signals), json.dumps(argv)], env=CHILD_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (signals / "at_step_1").exists():
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()[-3000:]
            time.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(OutputDirError) as refusal:
            pipeline.main(argv)
        assert time.monotonic() - started < 10
        assert str(folder) in str(refusal.value) and f"pid {child.pid}" in str(refusal.value)
    finally:
        (signals / "go").write_text("")
        _, stderr = child.communicate(timeout=240)
    assert child.returncode == 0, stderr[-3000:]
    assert json.loads((folder / "run_args.json").read_text())["finished"]
    assert is_complete(folder / "checkpoint-4")


def test_rotation_keeps_the_newest_the_best_and_everything_not_ours(tmp_path):
    def checkpoint(step, run_id=None):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if run_id is not None:
            (folder / "run_args.json").write_text(json.dumps({"run_id": run_id, "global_step": step}))
        return folder

    ours = [checkpoint(step, "ours") for step in (1, 2, 3, 4, 5)]
    theirs, unsealed = checkpoint(6, "theirs"), checkpoint(7)
    deleted = rotate(tmp_path, "ours", keep=2, protected={str(ours[0])})
    assert deleted == ours[1:4]
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == ["checkpoint-1", "checkpoint-5", "checkpoint-6", "checkpoint-7"]
    assert theirs.is_dir() and unsealed.is_dir()


def test_a_folder_left_by_a_kill_before_the_run_record_counts_as_empty(tmp_path):
    """A kill while loading data leaves the lock; one while writing the record leaves its temporary file."""
    (tmp_path / LOCK_FILE).write_text("pid 1")
    (tmp_path / ".run_args.json.k3j2").write_text('{"run_id": ')
    plan = prepare(tmp_path, {"training_args.seed": 0}, resume=None, overwrite=False)
    assert plan.resume_from is None and not plan.finished and not plan.notes
    (tmp_path / "stray.txt").write_text("")
    with pytest.raises(OutputDirError, match=r"is not empty \(stray.txt\)"):
        prepare(tmp_path, {"training_args.seed": 0}, resume=None, overwrite=False)


# Trains until step 5, says so in a file, and waits for the parent's go-ahead file (the signal arrives meanwhile).
HOLD_AT_STEP_FIVE = HOLD_AT_STEP_ONE.replace("state.global_step == 1", "state.global_step == 5").replace(
    "at_step_1", "at_step_5")


def wait_for(path: Path, child: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()[-3000:]
        time.sleep(0.05)


def test_sigterm_with_jit_checkpoint_saves_a_sealed_checkpoint_exits_nonzero_and_resumes(tmp_path, uninterrupted,
                                                                                         capsys):
    folder, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    argv = run_argv(folder, "--enable_jit_checkpoint", "true")
    child = subprocess.Popen([sys.executable, "-c", HOLD_AT_STEP_FIVE, str(signals), json.dumps(argv)], env=CHILD_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(signals / "at_step_5", child)
    os.kill(child.pid, signal.SIGTERM)  # as a scheduler does, some time before its SIGKILL
    (signals / "go").write_text("")
    _, stderr = child.communicate(timeout=240)
    assert child.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Training stopped at step 6 of 12 (SIGTERM); the run is not finished" in stderr
    assert is_complete(folder / "checkpoint-6")  # saved at the end of the step under way, and sealed
    assert not json.loads((folder / "run_args.json").read_text()).get("finished")
    assert not (folder / "model.safetensors").exists() and not (folder / "all_results.json").exists()

    capsys.readouterr()
    pipeline.main(argv)  # the same command
    assert f"Resuming from {folder / 'checkpoint-6'} " in capsys.readouterr().out
    assert json.loads((folder / "run_args.json").read_text())["finished"]
    assert_same_weights(folder, uninterrupted)
    assert_same_weights(folder / "checkpoint-12", uninterrupted / "checkpoint-12")


def test_resuming_a_checkpoint_at_the_last_step_adds_no_step(tmp_path, uninterrupted, capsys):
    class CrashAfterLastSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 12:  # the checkpoint is sealed (the pipeline's callback runs first)
                raise KeyboardInterrupt

    argv = run_argv(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(argv, callbacks=[CrashAfterLastSave()])
    assert is_complete(tmp_path / "checkpoint-12") and not (tmp_path / "model.safetensors").exists()
    pipeline.main(argv)
    assert f"Resuming from {tmp_path / 'checkpoint-12'} " in capsys.readouterr().out
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 12
    assert not (tmp_path / "checkpoint-13").exists()
    assert_same_weights(tmp_path, uninterrupted)


def test_a_model_only_checkpoint_is_resumed_only_when_allowed_and_says_what_is_reset(tmp_path, capsys):
    argv = run_argv(tmp_path, "--save_only_model", "true", "--warmup_steps", "4")
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(argv, callbacks=[CrashAt(6)])
    before = folder_digest(tmp_path)
    expected = r"checkpoint-4 was saved with save_only_model=True.*schedule starts again.*--allow_model_only_resume"
    with pytest.raises(OutputDirError, match=expected) as refusal:
        pipeline.main(argv)
    assert "AdamW's moments start again from zero" in str(refusal.value)
    assert folder_digest(tmp_path) == before

    capsys.readouterr()
    pipeline.main([*argv, "--allow_model_only_resume", "true"])
    out = capsys.readouterr().out
    assert f"WARNING: resuming from {tmp_path / 'checkpoint-4'}, saved with save_only_model=True" in out
    history = json.loads((tmp_path / "trainer_state.json").read_text())
    assert history["global_step"] == 12
    # The schedule did start again: at step 8 (resumed at 4) the learning rate is that of step 4 of a fresh one.
    rates = {entry["step"]: entry["learning_rate"] for entry in history["log_history"] if "learning_rate" in entry}
    assert rates[8] == pytest.approx(rates[4])


# Holds a lock through the real RunLock, then has datasets.map's worker processes (num_proc=2) each say they
# are running and wait, as a tokenizing step on a big corpus does.
LOCK_THEN_MAP = """
import os, sys, time
import datasets
from hf_posvariants.training.run_folder import RunLock

RunLock(sys.argv[1]).acquire()

def slow(batch):
    open(os.path.join(sys.argv[2], f"worker-{os.getpid()}"), "w").close()
    time.sleep(120)
    return batch

datasets.Dataset.from_dict({"x": list(range(4))}).map(slow, batched=True, batch_size=2, num_proc=2)
"""


def test_datasets_map_workers_of_a_killed_run_do_not_keep_its_lock(tmp_path):
    folder, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    # A session of its own, so that the cleanup can end every process the run forked (the pool keeps more than the
    # two workers that report themselves).
    child = subprocess.Popen([sys.executable, "-c", LOCK_THEN_MAP, str(folder), str(signals)], env=CHILD_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2:
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()[-3000:]
            workers = [int(path.name.split("-")[1]) for path in signals.glob("worker-*")]
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)  # an OOM kill of the training process
        child.wait(timeout=60)
        for pid in workers:
            os.kill(pid, 0)  # the workers are still alive...
        RunLock(folder).acquire().release()  # ...and the folder is free for the requeued run
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow  # ~8 s; the datasets.map test above covers the same lock in the default suite
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the DataLoader workers in /proc")
def test_dataloader_workers_of_a_killed_run_do_not_keep_its_lock(tmp_path):
    folder, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    argv = tiny_argv(folder, "clm", "posvar_llama", "--max_steps", "4", "--eval_strategy", "no",
                     "--dataloader_num_workers", "2", "--dataloader_persistent_workers", "true")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", HOLD_AT_STEP_ONE, str(signals), json.dumps(argv)], env=CHILD_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(signals / "at_step_1", child)
    workers = _children(child.pid)
    assert len(workers) >= 2
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    RunLock(folder).acquire().release()
    assert alive, "the workers had gone before the lock was tried: the test proved nothing"


def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_newest_intact_one(tmp_path, uninterrupted,
                                                                                     capsys):
    argv = run_argv(tmp_path)
    child = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "seal_checkpoint", "after", "8", json.dumps(argv)],
                           env=CHILD_ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert is_complete(tmp_path / "checkpoint-8")
    optimizer = tmp_path / "checkpoint-8" / "optimizer.pt"
    size = optimizer.stat().st_size
    os.truncate(optimizer, size // 2)  # a copy cut short, a disk error

    capsys.readouterr()
    pipeline.main(argv)  # the same command
    out = capsys.readouterr().out
    assert (f"WARNING: {tmp_path / 'checkpoint-8'} is damaged (optimizer.pt is {size // 2} bytes, {size} when it "
            "was saved); not resuming from it") in out  # fmt: skip
    assert f"Resuming from {tmp_path / 'checkpoint-4'} " in out
    assert_same_weights(tmp_path, uninterrupted)
    assert is_complete(tmp_path / "checkpoint-8") and damage(tmp_path / "checkpoint-8") is None  # saved again


def test_damage_reads_sizes_and_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    save_file({"w": torch.ones(64)}, checkpoint / "model.safetensors")
    (checkpoint / "optimizer.pt").write_bytes(b"x" * 100)
    assert damage(checkpoint) is None  # no record: the headers alone
    seal_checkpoint(checkpoint, {"run_id": "r"}, 3)
    assert damage(checkpoint) is None
    os.truncate(checkpoint / "optimizer.pt", 10)
    assert damage(checkpoint) == "optimizer.pt is 10 bytes, 100 when it was saved"
    (checkpoint / "run_args.json").unlink()
    size = (checkpoint / "model.safetensors").stat().st_size
    os.truncate(checkpoint / "model.safetensors", size - 4)
    assert damage(checkpoint) == f"model.safetensors is {size - 4} bytes; its header describes {size}"
    os.truncate(checkpoint / "model.safetensors", 5)
    assert damage(checkpoint) == "model.safetensors is 5 bytes, too short for a safetensors header"


def test_a_checkpoint_that_cannot_be_deleted_is_left_with_a_warning(tmp_path, monkeypatch, caplog):
    delete = shutil.rmtree

    def refusing(path, *args, **kwargs):
        if Path(path).name == "checkpoint-4":  # a read-only copy, a busy NFS file
            raise PermissionError(13, "Permission denied", str(Path(path) / "optimizer.pt"))
        delete(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refusing)
    with caplog.at_level(logging.WARNING, logger="hf_posvariants.training.run_folder"):
        pipeline.main(run_argv(tmp_path, "--save_total_limit", "1"))
    assert json.loads((tmp_path / "run_args.json").read_text())["finished"]
    warning = f"Could not delete {tmp_path / 'checkpoint-4'} (save_total_limit=1): [Errno 13] Permission denied"
    assert warning in caplog.text
    # It no longer counts as a checkpoint of the run: never resumed from, never retried.
    assert (tmp_path / "checkpoint-4").is_dir() and not is_complete(tmp_path / "checkpoint-4")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4"]


def test_a_plain_trainer_folder_is_refused_with_a_way_that_works_and_continued_when_asked(tmp_path, uninterrupted,
                                                                                          capsys):
    argv = run_argv(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(argv, callbacks=[CrashAt(10)])
    # What a plain transformers Trainer leaves: checkpoints without run record, model code or tokenizer.
    (tmp_path / "run_args.json").unlink()
    for checkpoint in tmp_path.glob("checkpoint-*"):
        for path in [checkpoint / "run_args.json", *checkpoint.glob("*.py"), *checkpoint.glob("tokenizer*")]:
            path.unlink()
    with pytest.raises(OutputDirError, match="its transformers Trainer checkpoints can be continued") as refusal:
        pipeline.main(argv)
    assert "add --resume_from_checkpoint last to continue it" in str(refusal.value)

    # Such a checkpoint named as --resume_from_checkpoint PATH continues in another folder too.
    elsewhere = tmp_path / "elsewhere"
    pipeline.main([*argv, "--output_dir", str(elsewhere), "--resume_from_checkpoint", str(tmp_path / "checkpoint-8")])
    assert_same_weights(elsewhere, uninterrupted)
    shutil.rmtree(elsewhere)

    capsys.readouterr()
    pipeline.main([*argv, "--resume_from_checkpoint", "last"])  # the way the message gives
    out = capsys.readouterr().out
    assert f"Resuming from {tmp_path / 'checkpoint-8'} (a transformers Trainer checkpoint)" in out
    assert_same_weights(tmp_path, uninterrupted)

    # A folder with no checkpoint to continue is not told to continue it.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("")
    with pytest.raises(OutputDirError) as refusal:
        pipeline.main([*argv, "--output_dir", str(foreign), "--resume_from_checkpoint", "last"])
    assert "--resume_from_checkpoint last" not in str(refusal.value)
    assert "--overwrite_output_dir true" in str(refusal.value)


# Mounts a 400 kB file system on $0 in a private mount namespace, then runs the command: the first
# checkpoint (630 kB) fills it.
ON_A_SMALL_DISK = 'mount -t tmpfs -o size=400k tmpfs "$0" && exec "$@"'


@pytest.mark.slow  # ~8 s: a training process in a mount namespace
def test_a_full_disk_is_named_with_the_file_being_written(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = ["unshare", "-rm", "sh", "-c", ON_A_SMALL_DISK, str(disk), "true"]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("needs unshare and user namespaces to mount a small file system")
    main = "import json, sys; from hf_posvariants.training import pipeline; pipeline.main(json.loads(sys.argv[1]))"
    child = subprocess.run(["unshare", "-rm", "sh", "-c", ON_A_SMALL_DISK, str(disk), sys.executable, "-c", main,
                            json.dumps(run_argv(disk / "run"))], env=CHILD_ENV, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert child.returncode == 1
    last_line = child.stderr.strip().splitlines()[-1]
    checkpoint = disk / "run" / "checkpoint-4"
    assert re.fullmatch(rf"OSError: \[Errno 28\] no space left on tmpfs \(mounted on {re.escape(str(disk))}\) while "
                        rf"writing {re.escape(str(checkpoint))}/[\w.]+", last_line), child.stderr[-3000:]  # fmt: skip


# Each rank of a two-process gloo run writes its pid at step 5 and waits for the parent's go-ahead file.
DDP_HOLD_AT_STEP_FIVE = """
import json, os, sys, time
from pathlib import Path
from transformers import TrainerCallback
from hf_posvariants.training import pipeline

class Hold(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            Path(sys.argv[1], f"rank{os.environ['RANK']}").write_text(str(os.getpid()))
            while not Path(sys.argv[1], "go").exists():
                time.sleep(0.05)

pipeline.main(json.loads(sys.argv[2]), callbacks=[Hold()])
"""


@pytest.mark.slow  # two torchrun launches: ~40 s on 2 cores
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_saved_step(tmp_path):
    folder, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    argv = run_argv(folder, "--enable_jit_checkpoint", "true", "--per_device_train_batch_size", "4")
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_HOLD_AT_STEP_FIVE)
    command = [*TORCHRUN, "--nproc_per_node", "2", str(driver), str(signals),
               json.dumps(argv)]  # fmt: skip
    child = subprocess.Popen(command, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for rank in (0, 1):
        wait_for(signals / f"rank{rank}", child)
    os.kill(int((signals / "rank1").read_text()), signal.SIGTERM)  # one rank only: the other must follow it
    (signals / "go").write_text("")
    _, stderr = child.communicate(timeout=300)
    assert child.returncode != 0 and "exitcode  : 143" in stderr, stderr[-3000:]
    assert is_complete(folder / "checkpoint-6")
    rng_states = {path.name for path in (folder / "checkpoint-6").glob("rng_state*")}
    assert rng_states == {"rng_state_0.pth", "rng_state_1.pth"}  # both ranks saved at the same step
    assert not json.loads((folder / "run_args.json").read_text()).get("finished")

    (signals / "go").unlink()
    for rank in (0, 1):
        (signals / f"rank{rank}").unlink()
    resumed = subprocess.run(command, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 12


def make_older(folder: Path) -> None:
    """Rewrite every run record in `folder` as versions before text_column's default ('text') wrote them for
    the same command: text_column unset, no `distributed` setting, no data hash, adopted or file sizes."""
    for path in [folder / "run_args.json", *folder.glob("checkpoint-*/run_args.json")]:
        record = json.loads(path.read_text())
        for key in ("adopted", "dataset_sha256", "files"):
            record.pop(key, None)
        record["data_args"]["text_column"] = record["settings"]["data_args.text_column"] = None
        record["model_args"].pop("distributed")
        record["settings"].pop("model_args.distributed")
        path.write_text(json.dumps(record, indent=2))


def test_a_run_recorded_before_text_columns_default_resumes_on_data_with_a_text_column(tmp_path, uninterrupted,
                                                                                        capsys):
    argv = run_argv(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(argv, callbacks=[CrashAt(6)])
    make_older(tmp_path)

    capsys.readouterr()
    pipeline.main(argv)  # the same command: an unset text_column chose 'text', which the data has
    assert f"Resuming from {tmp_path / 'checkpoint-4'} " in capsys.readouterr().out
    assert_same_weights(tmp_path, uninterrupted)
    assert json.loads((tmp_path / "run_args.json").read_text())["settings"]["data_args.text_column"] == "text"


def test_a_run_recorded_before_text_columns_default_is_refused_where_it_trained_on_another_column(tmp_path):
    # Older versions trained on the first text column where there was no 'text': here the ids.
    rows = "".join(json.dumps({"id": f"row-{i}", "body": f"line {i} of the poem, and then some"}) + "\n"
                   for i in range(300))  # fmt: skip
    (tmp_path / "data.jsonl").write_text(rows)
    argv = tiny_argv(tmp_path / "run", "clm", "posvar_llama", "--train_file", str(tmp_path / "data.jsonl"),
                     "--text_column", "body", "--max_steps", "3", "--save_steps", "1",
                     "--eval_strategy", "no")  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(argv, callbacks=[CrashAt(2)])
    make_older(tmp_path / "run")
    before = folder_digest(tmp_path / "run")
    with pytest.raises(OutputDirError, match=r"started with text_column unset, which chose the column from the data: "
                                             r"on this data it trained on its column 'id', not text_column='body'\. "
                                             r"Add --text_column id to resume it"):  # fmt: skip
        pipeline.main(argv)
    assert folder_digest(tmp_path / "run") == before
    # Continuing it with the settings given is asked for, and says what changed.
    plan = prepare(tmp_path / "run", json.loads((tmp_path / "run" / "run_args.json").read_text())["settings"]
                   | {"data_args.text_column": "body", "model_args.distributed": None}, "last", False)  # fmt: skip
    assert "data_args.text_column: None → body" in plan.notes[0] and not plan.text_column_from_data


@pytest.mark.slow  # three runs: ~15 s
def test_a_sealed_checkpoint_saved_again_is_unsealed_first_so_a_kill_midway_leaves_it_incomplete(tmp_path, capsys):
    """Resumed from an earlier checkpoint (of this version or an older one), a run saves again at a step it
    saved before: the Trainer rewrites that folder in place, and the seal must go first, or a kill halfway
    leaves new weights and optimizer beside the old RNG and Trainer state under a seal whose sizes still match."""
    argv = run_argv(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(argv, callbacks=[CrashAt(10)])
    assert is_complete(tmp_path / "checkpoint-8")
    # Continue from checkpoint-4 with another learning rate: checkpoint-8 gets other weights.
    changed = [*argv, "--learning_rate", "0.001"]
    child = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "_save_rng_state", "before", "8",
                            json.dumps([*changed, "--resume_from_checkpoint", str(tmp_path / "checkpoint-4")])],
                           env=CHILD_ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert not is_complete(tmp_path / "checkpoint-8")

    capsys.readouterr()
    pipeline.main(changed)  # the command of the continued run
    out = capsys.readouterr().out
    assert "Skipping checkpoint-8: not a complete checkpoint of this run" in out
    assert f"Resuming from {tmp_path / 'checkpoint-4'} " in out
    assert is_complete(tmp_path / "checkpoint-8") and damage(tmp_path / "checkpoint-8") is None
