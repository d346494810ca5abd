"""The output folder of a training run: who may write it, what it holds, where a re-run resumes.

- A lock (`fcntl.flock` on `.posvar.lock`) is held by the writing process for the whole run; a second
  run on the same folder fails at once, naming the folder and the process holding it. The kernel drops
  the lock when its holder dies, even by SIGKILL, so a crashed run never leaves a stale lock.
- The run record (`run_args.json`) at the folder's top says which settings the run was started with.
  Re-running the same command resumes it; a folder of a different run is refused unless the user asks
  to overwrite it or to continue it (`--resume_from_checkpoint last`).
- A checkpoint is complete once a copy of the run record, written atomically after every other file
  of the checkpoint is on disk, sits in it. Resume and rotation consider complete checkpoints of this
  run only, so a checkpoint cut short by a crash is never loaded and a folder the run did not write is
  never deleted.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

RUN_RECORD_FILE = "run_args.json"
LOCK_FILE = ".posvar.lock"
LAST = "last"
# Settings that change how a run is watched or where it writes, not what it computes: a re-run that
# differs only in these is the same run.
NEUTRAL_SETTINGS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "local_rank", "disable_tqdm", "report_to",
    "run_name", "project", "push_to_hub", "save_total_limit", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "ddp_timeout", "log_level", "log_level_replica",
    "log_on_each_node", "skip_memory_metrics", "torch_num_threads", "preprocessing_num_workers",
}  # fmt: skip
NEUTRAL_PREFIXES = ("logging_", "hub_", "trackio_")


class OutputDirError(ValueError):
    """The output folder cannot be used as asked (another run's, or in use)."""


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader sees the old file or the whole new one."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    # A temporary file is private (0600); give the file the mode it had, or the usual one.
    os.chmod(handle.name, path.stat().st_mode & 0o777 if path.exists() else 0o644)
    os.replace(handle.name, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_run_record(folder: str | Path) -> dict | None:
    path = Path(folder) / RUN_RECORD_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_run_record(folder: str | Path, record: dict) -> None:
    write_text_atomic(Path(folder) / RUN_RECORD_FILE, json.dumps(record, indent=2, default=str) + "\n")


def run_settings(sections: dict[str, dict]) -> dict:
    """`{"section.key": value}` of everything that decides what a run computes, as JSON values."""
    flat = {
        f"{section}.{key}": value
        for section, values in sections.items()
        for key, value in values.items()
        if key not in NEUTRAL_SETTINGS and not key.startswith(NEUTRAL_PREFIXES)
    }
    return json.loads(json.dumps(flat, default=str))


def setting_changes(recorded: dict, current: dict) -> list[str]:
    """'key: old → new' for every setting that differs."""
    keys = sorted(set(recorded) | set(current))
    missing = "(unset)"
    return [f"{key}: {recorded.get(key, missing)} → {current.get(key, missing)}" for key in keys
            if recorded.get(key, missing) != current.get(key, missing)]  # fmt: skip


class RunLock:
    """An exclusive lock on an output folder for one process; `acquire` fails at once when it is held."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self._descriptor: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(descriptor)
            raise OutputDirError(
                f"output_dir {str(self.path.parent)!r} is in use by another training run ({holder}); wait for it "
                "to finish or choose another output_dir."
            ) from None
        # Who holds it, for the message above; never the command line, which may carry a token.
        holder = (f"pid {os.getpid()} on {socket.gethostname()}, {Path(sys.argv[0]).name}, started "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC")  # fmt: skip
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, holder.encode(), 0)
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is not None:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def checkpoint_step(path: Path) -> int | None:
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    suffix = path.name[len(prefix) :]
    return int(suffix) if path.name.startswith(prefix) and suffix.isdigit() and path.is_dir() else None


def checkpoints(folder: str | Path) -> list[Path]:
    """`checkpoint-N` folders, oldest step first."""
    folder = Path(folder)
    found = [path for path in folder.iterdir() if checkpoint_step(path) is not None] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint: str | Path, run_id: str | None = None) -> bool:
    """Whether the checkpoint's record was written (it is written last), by run `run_id` if given."""
    record = read_run_record(checkpoint)
    return record is not None and "global_step" in record and (run_id is None or record.get("run_id") == run_id)


def seal_checkpoint(checkpoint: str | Path, record: dict, global_step: int) -> None:
    """Flush every file of the checkpoint to disk, then write its record: from now on it is complete."""
    checkpoint = Path(checkpoint)
    for path in checkpoint.rglob("*"):
        if path.is_file() and path.name != RUN_RECORD_FILE:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    write_run_record(checkpoint, {**record, "global_step": global_step})


@dataclass
class RunPlan:
    """What `prepare` decided: the run's id, the checkpoint to resume from, and whether it is done already."""

    run_id: str
    resume_from: str | None = None
    finished: bool = False
    notes: list[str] = field(default_factory=list)


def _is_control_file(name: str) -> bool:
    """The lock, and a temporary run record left by a kill during its atomic write."""
    return name == LOCK_FILE or name.startswith(f".{RUN_RECORD_FILE}.")


def _refusal(folder: Path, why: str) -> OutputDirError:
    return OutputDirError(
        f"output_dir {str(folder)!r} {why}. Choose another output_dir, add --overwrite_output_dir to start a new "
        "run there (its files are replaced as the new run writes them; nothing else is deleted), or add "
        "--resume_from_checkpoint last to continue it with the new settings."
    )


def prepare(folder: str | Path, settings: dict, resume: str | None, overwrite: bool) -> RunPlan:
    """Decide how a run uses `folder`, from its settings, --resume_from_checkpoint and --overwrite_output_dir."""
    folder = Path(folder)
    if overwrite and resume == LAST:
        raise ValueError(
            "overwrite_output_dir=True starts a new run; it cannot be combined with resume_from_checkpoint='last'."
        )
    record = read_run_record(folder)
    contents = sorted(p.name for p in folder.iterdir() if not _is_control_file(p.name)) if folder.is_dir() else []
    if not contents or overwrite:
        plan = RunPlan(run_id=uuid.uuid4().hex)
        if contents:
            plan.notes.append(f"Overwriting output_dir {str(folder)!r} (--overwrite_output_dir): a new run starts.")
    elif record is None or "run_id" not in record:
        listed = ", ".join(contents[:5]) + (", …" if len(contents) > 5 else "")
        raise _refusal(folder, f"is not empty ({listed}) and holds no run record of this pipeline")
    else:
        changes = setting_changes(record.get("settings", {}), settings)
        if changes and resume is None:
            raise _refusal(folder, "holds a different run; its settings differ in " + "; ".join(changes))
        plan = RunPlan(run_id=record["run_id"], finished=bool(record.get("finished")) and not changes)
        if changes:
            plan.notes.append("Continuing the run in output_dir with changed settings: " + "; ".join(changes))
    if plan.finished and resume is None:
        plan.notes.append(f"The run in {str(folder)!r} has already finished; nothing to train.")
        return plan
    plan.finished = False
    plan.resume_from = _resume_checkpoint(folder, plan, resume, overwrite)
    return plan


def _resume_checkpoint(folder: Path, plan: RunPlan, resume: str | None, overwrite: bool) -> str | None:
    if resume not in (None, LAST):
        if not is_complete(resume):
            raise ValueError(f"resume_from_checkpoint={resume!r} is not a complete checkpoint of this pipeline "
                             f"(no {RUN_RECORD_FILE} with a global_step: missing, or cut short while saving).")
        return str(resume)
    if overwrite:
        return None
    complete = [path for path in checkpoints(folder) if is_complete(path, plan.run_id)]
    newest = complete[-1] if complete else None
    newest_step = checkpoint_step(newest) if newest else -1
    for path in checkpoints(folder):
        if checkpoint_step(path) > newest_step and not is_complete(path, plan.run_id):
            plan.notes.append(f"Skipping {path.name}: not a complete checkpoint of this run (cut short while "
                              "saving, or not written by it).")
    if newest is None:
        if resume == LAST:
            raise ValueError(f"resume_from_checkpoint='last': output_dir {str(folder)!r} holds no complete checkpoint.")
        if any(True for _ in checkpoints(folder)):
            plan.notes.append("No complete checkpoint of this run yet: training starts at step 0.")
        return None
    plan.notes.append(f"Resuming from {newest} (the newest complete checkpoint of this run).")
    return str(newest)


def rotate(folder: str | Path, run_id: str, keep: int | None, protected: set[str],
           before_delete: Callable[[Path], None] = lambda path: None) -> list[Path]:
    """Delete the oldest complete checkpoints of run `run_id` beyond `keep`; never another run's, an
    incomplete one, or a protected one (the best). Returns the deleted folders."""
    if not keep or keep <= 0:
        return []
    own = [path for path in checkpoints(folder) if is_complete(path, run_id)]
    deletable = [path for path in own[:-1] if str(path) not in protected]
    deleted = deletable[: max(len(own) - keep, 0)]
    for path in deleted:
        before_delete(path)
        logger.info("Deleting %s (save_total_limit=%d)", path, keep)
        shutil.rmtree(path)
    return deleted
