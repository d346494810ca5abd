"""The output folder of a training run: who may write it, what it holds, where a re-run resumes.

- A lock (`fcntl.flock` on `.posvar.lock`) is held by the writing process for the whole run; a second
  run on the same folder fails at once, naming the folder and the process holding it. The kernel drops
  the lock when its holder dies, even by SIGKILL, so a crashed run never leaves a stale lock; processes
  it forks (`datasets.map` and DataLoader workers) close their copy at once, so they never keep it.
- The run record (`run_args.json`) at the folder's top says which settings the run was started with.
  Re-running the same command resumes it; a folder of a different run, or of a plain transformers
  Trainer, is refused unless the user asks to overwrite it or to continue it (`--resume_from_checkpoint
  last`, offered only where there is a checkpoint to continue).
- A checkpoint is complete once a copy of the run record, written atomically after every other file
  of the checkpoint is on disk, sits in it; the copy lists each file's size. Resume and rotation consider
  complete checkpoints of this run only, so a checkpoint cut short by a crash is never loaded and a folder
  the run did not write is never deleted. A checkpoint saved again (a run continued from an earlier one
  reaches its step) loses its record before the Trainer rewrites its files in place. Resume verifies the
  checkpoint it picks (sizes, safetensors headers) and falls back to the newest intact one, naming the
  damaged one; a checkpoint saved without its optimizer state (`save_only_model`) is resumed only when
  the user allows it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

RUN_RECORD_FILE = "run_args.json"
LOCK_FILE = ".posvar.lock"
LAST = "last"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer's name (that module is slow to import)
# transformers' own emergency (JIT) checkpoint leaves this file in a checkpoint it did not finish.
TRAINER_INCOMPLETE_MARK = "checkpoint-is-incomplete.txt"
# Settings that change how a run is watched or where it writes, not what it computes: a re-run that
# differs only in these is the same run.
NEUTRAL_SETTINGS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "local_rank", "disable_tqdm", "report_to",
    "run_name", "project", "push_to_hub", "save_total_limit", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "ddp_timeout", "log_level", "log_level_replica",
    "log_on_each_node", "skip_memory_metrics", "torch_num_threads", "preprocessing_num_workers",
    "enable_jit_checkpoint", "allow_model_only_resume", "max_dropped_fraction",
}  # fmt: skip
NEUTRAL_PREFIXES = ("logging_", "hub_", "trackio_")
# Settings that older versions did not record, with the value that does what those versions did.
ADDED_SETTINGS = {"model_args.distributed": None}
# Older versions recorded text_column None (unset): they chose the column from the data, `text` where there
# was one, else the first text column. Whether that is the text_column given now is known once the data is read.
TEXT_COLUMN_SETTING = "data_args.text_column"


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


@contextmanager
def folder_written_whole(folder: str | Path) -> Iterator[Path]:
    """A folder to write `folder`'s new contents into (`.NAME.partial` beside it); once the block ends without an
    error it takes `folder`'s place by renames, so a kill halfway never leaves a half-written `folder` that looks
    whole. The partial folder holds a `RunLock` from its creation until just before the renames: the proof that it
    is ours. A kill's leftover one (its lock free) is replaced by the next write, which logs it; an error's goes at
    once; one without the lock file (not ours) or locked (being written) is refused."""
    folder = Path(folder).resolve()
    partial, old = (folder.with_name(f".{folder.name}.{suffix}") for suffix in ("partial", "old"))
    remove_leftover_partial(partial, folder)
    partial.mkdir(parents=True)  # not exist_ok: another writer's, made since, is not reused
    lock = partial_lock(partial, folder)
    try:
        yield partial
        lock.path.unlink()  # written whole: the folder becomes the user's, without our lock file
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        lock.release()
    if folder.is_dir() and any(folder.iterdir()):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(partial, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, folder)  # rename(2) takes the place of an empty folder
    _fsync_folder(folder.parent)


def partial_lock(partial: Path, folder: Path) -> RunLock:
    """The lock of `folder`'s partial folder, taken; refused while another process writes `folder` through it."""
    lock = RunLock(partial)
    holder = lock.try_acquire()
    if holder is not None:
        raise OutputDirError(f"{folder} is being written by another process ({holder}); wait for it to finish.")
    return lock


def remove_leftover_partial(partial: Path, folder: Path) -> None:
    """Remove the partial folder a killed write of `folder` left (it holds our lock file, which nobody holds now),
    saying so in one line; refuse, leaving it, one that is not ours (no lock file) or that a live process writes."""
    if not os.path.lexists(partial):
        return
    mark = partial / LOCK_FILE
    if partial.is_symlink() or not partial.is_dir() or not mark.is_file():
        raise OutputDirError(f"{partial} is in the way of writing {folder}, and is no partial folder this package "
                             f"left (a folder, not a link, holding its {LOCK_FILE}); move or remove it, then write "
                             "again.")  # fmt: skip
    writer = mark.read_text().strip() or "unknown process"
    lock = partial_lock(partial, folder)
    try:
        logger.warning("Removing %s, left by a write of %s that was killed (%s); writing it afresh.", partial,
                       folder, writer)  # fmt: skip
        shutil.rmtree(partial)
    finally:
        lock.release()


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


def _is_neutral(key: str) -> bool:
    return key in NEUTRAL_SETTINGS or key.startswith(NEUTRAL_PREFIXES)


def run_settings(sections: dict[str, dict]) -> dict:
    """`{"section.key": value}` of everything that decides what a run computes, as JSON values."""
    flat = {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()
            if not _is_neutral(key)}  # fmt: skip
    return json.loads(json.dumps(flat, default=str))


def older_settings_upgraded(recorded: dict, current: dict) -> tuple[dict, bool]:
    """A record's settings in today's terms: settings added since it was written take the value that does
    what its version did, and an unset text_column stands for the one given now. The flag says whether it
    did: then the text column was chosen from the data, and the run may resume only if the data still
    gives the same one (see `pipeline.check_text_column_of_older_run`)."""
    upgraded = {**{key: value for key, value in ADDED_SETTINGS.items() if key in current}, **recorded}
    chosen_from_data = recorded.get(TEXT_COLUMN_SETTING, "") is None and current.get(TEXT_COLUMN_SETTING) is not None
    if chosen_from_data:
        upgraded[TEXT_COLUMN_SETTING] = current[TEXT_COLUMN_SETTING]
    return upgraded, chosen_from_data


def setting_changes(recorded: dict, current: dict) -> list[str]:
    """'key: old → new' for every setting that differs (a record written before a setting became neutral
    may still hold it)."""
    keys = sorted(key for key in set(recorded) | set(current) if not _is_neutral(key.rpartition(".")[2]))
    missing = "(unset)"
    return [f"{key}: {recorded.get(key, missing)} → {current.get(key, missing)}" for key in keys
            if recorded.get(key, missing) != current.get(key, missing)]  # fmt: skip


# Descriptors of the locks this process holds. A forked child shares the lock with its parent (flock belongs
# to the open file, which fork shares), so a worker outliving a killed parent would keep the folder locked;
# the child closes its copies at once. Closing, not unlocking: an unlock would release the parent's lock too.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for descriptor in _HELD_LOCKS:
        os.close(descriptor)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLock:
    """An exclusive lock on an output folder for one process (not its forked children); `acquire` fails at
    once when it is held."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self._descriptor: int | None = None
        self._owner: int | None = None

    def acquire(self) -> RunLock:
        holder = self.try_acquire()
        if holder is not None:
            raise OutputDirError(
                f"output_dir {str(self.path.parent)!r} is in use by another training run ({holder}); wait for it "
                "to finish or choose another output_dir."
            )
        return self

    def try_acquire(self) -> str | None:
        """Take the lock (None), or leave it to the process holding it and say which one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(descriptor)
            return holder
        # Who holds it, for the message above; never the command line, which may carry a token.
        holder = (f"pid {os.getpid()} on {socket.gethostname()}, {Path(sys.argv[0]).name}, started "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC")  # fmt: skip
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, holder.encode(), 0)
        self._descriptor, self._owner = descriptor, os.getpid()
        _HELD_LOCKS.add(descriptor)
        return None

    def release(self) -> None:
        if self._descriptor is not None and self._owner == os.getpid():  # a forked child has closed its copy
            _HELD_LOCKS.discard(self._descriptor)
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


def check_model_folder(folder: Path, field: str) -> None:
    """Refuse a `field` that is not a saved model folder, naming the checkpoints of a run that has not finished."""
    if not folder.is_dir():
        raise ValueError(f"{field}={str(folder)!r} is not a folder; give the folder scripts/train.py or "
                         "save_pretrained wrote (a run folder or one of its checkpoint-N folders).")  # fmt: skip
    if not (folder / "config.json").is_file():
        saved = [path.name for path in checkpoints(folder)]
        hint = f"; its checkpoints {saved} each hold one" if saved else ""
        raise ValueError(f"{field}={str(folder)!r} holds no saved model (no config.json: a run writes its model "
                         f"when it finishes){hint}.")  # fmt: skip


def is_complete(checkpoint: str | Path, run_id: str | None = None) -> bool:
    """Whether the checkpoint's record was written (it is written last), by run `run_id` if given."""
    record = read_run_record(checkpoint)
    return record is not None and "global_step" in record and (run_id is None or record.get("run_id") == run_id)


def is_trainer_checkpoint(checkpoint: str | Path) -> bool:
    """A checkpoint of a plain transformers Trainer: it has the Trainer's state (written last), and no mark
    of an emergency save left unfinished."""
    checkpoint = Path(checkpoint)
    return (checkpoint / TRAINER_STATE_NAME).is_file() and not (checkpoint / TRAINER_INCOMPLETE_MARK).exists()


def lacks_training_state(checkpoint: str | Path) -> bool:
    """Saved with `save_only_model`: the Trainer writes the RNG states (`rng_state*.pth`) together with the
    optimizer and scheduler states, in every setup, and none of them without it."""
    return not any(Path(checkpoint).glob("rng_state*.pth"))


def seal_checkpoint(checkpoint: str | Path, record: dict, global_step: int) -> None:
    """Flush every file of the checkpoint to disk, then write its record, with each file's size: from now on
    it is complete."""
    checkpoint = Path(checkpoint)
    sizes = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.name != RUN_RECORD_FILE:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            sizes[str(path.relative_to(checkpoint))] = path.stat().st_size
    write_run_record(checkpoint, {**record, "global_step": global_step, "files": sizes})


def unseal(checkpoint: str | Path) -> None:
    """Remove the record that makes a checkpoint complete (before deleting or rewriting it)."""
    (Path(checkpoint) / RUN_RECORD_FILE).unlink(missing_ok=True)
    _fsync_folder(Path(checkpoint))


def damage(checkpoint: str | Path) -> str | None:
    """What is wrong with a checkpoint's files, or None: a file its record lists that is missing or has
    another size, or a safetensors file whose header does not describe it."""
    checkpoint = Path(checkpoint)
    for name, size in ((read_run_record(checkpoint) or {}).get("files") or {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when it was saved"
    for path in sorted(checkpoint.rglob("*.safetensors")):
        problem = _safetensors_damage(path)
        if problem is not None:
            return f"{path.relative_to(checkpoint)} {problem}"
    return None


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit


def _safetensors_damage(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes up to the
    largest end offset the header gives."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"is {size} bytes, too short for a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"is {size} bytes, shorter than the {length}-byte header it declares"
        if length > SAFETENSORS_MAX_HEADER:
            return f"declares a {length}-byte header, more than safetensors allows"
        try:
            tensors = [entry for key, entry in json.loads(handle.read(length)).items() if key != "__metadata__"]
            end = max((entry["data_offsets"][1] for entry in tensors), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "has an unreadable header"
    return None if 8 + length + end == size else f"is {size} bytes; its header describes {8 + length + end}"


@dataclass
class RunPlan:
    """What `prepare` decided: the run's id, the checkpoint to resume from, and whether it is done already.
    `adopted` names the plain transformers Trainer checkpoint in the folder that the run started from.
    `text_column_from_data`: the run was started by a version that chose its text column from the data; the
    same command resumes it only if the data still gives the text_column it names."""

    run_id: str
    resume_from: str | None = None
    finished: bool = False
    adopted: str | None = None
    notes: list[str] = field(default_factory=list)
    text_column_from_data: bool = False


def _is_control_file(name: str) -> bool:
    """The lock, and a temporary run record left by a kill during its atomic write."""
    return name == LOCK_FILE or name.startswith(f".{RUN_RECORD_FILE}.")


def _refusal(folder: Path, why: str, resumable: bool) -> OutputDirError:
    """The refusal of a folder, offering `--resume_from_checkpoint last` only where it works."""
    resume = ", or add --resume_from_checkpoint last to continue it with the settings given" if resumable else ""
    return OutputDirError(
        f"output_dir {str(folder)!r} {why}. Choose another output_dir, or add --overwrite_output_dir true to start a "
        f"new run there (its files are replaced as the new run writes them; nothing else is deleted){resume}."
    )


def prepare(folder: str | Path, settings: dict, resume: str | None, overwrite: bool,
            allow_model_only: bool = False) -> RunPlan:  # fmt: skip
    """Decide how a run uses `folder`, from its settings, --resume_from_checkpoint, --overwrite_output_dir and
    --allow_model_only_resume."""
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
        plan = _adopt(folder, contents, resume)
    else:
        recorded, from_data = older_settings_upgraded(record.get("settings", {}), settings)
        if resume is not None and from_data:  # continuing with the settings given: an unset text_column is a change
            recorded[TEXT_COLUMN_SETTING], from_data = None, False
        changes = setting_changes(recorded, settings)
        if changes and resume is None:
            resumable = any(is_complete(path, record["run_id"]) for path in checkpoints(folder))
            raise _refusal(folder, "holds a different run; its settings differ in " + "; ".join(changes), resumable)
        plan = RunPlan(run_id=record["run_id"], finished=bool(record.get("finished")) and not changes,
                       adopted=record.get("adopted"), text_column_from_data=from_data)  # fmt: skip
        if changes:
            plan.notes.append("Continuing the run in output_dir with changed settings: " + "; ".join(changes))
    if plan.finished and resume is None:
        plan.notes.append(f"The run in {str(folder)!r} has already finished; nothing to train.")
        return plan
    plan.finished = False
    plan.resume_from = _resume_checkpoint(folder, plan, resume, overwrite)
    if plan.resume_from is not None:
        _check_training_state(plan, allow_model_only)
    return plan


def _adopt(folder: Path, contents: list[str], resume: str | None) -> RunPlan:
    """A folder this pipeline did not write: a new run continues its plain Trainer checkpoints when asked."""
    listed = ", ".join(contents[:5]) + (", …" if len(contents) > 5 else "")
    resumable = any(is_trainer_checkpoint(path) for path in checkpoints(folder))
    if resume is None or not resumable:
        why = f"is not empty ({listed}) and holds no run record of this pipeline" + (
            "; its transformers Trainer checkpoints can be continued" if resumable else "")  # fmt: skip
        raise _refusal(folder, why, resumable)
    plan = RunPlan(run_id=uuid.uuid4().hex)
    plan.notes.append(f"output_dir {str(folder)!r} holds no run record of this pipeline: a new run starts there with "
                      "the settings given, from a transformers Trainer checkpoint.")  # fmt: skip
    return plan


def _resume_checkpoint(folder: Path, plan: RunPlan, resume: str | None, overwrite: bool) -> str | None:
    if resume not in (None, LAST):
        return _named_checkpoint(Path(resume), plan)
    if overwrite:
        return None
    ours = read_run_record(folder) is not None
    complete = [path for path in checkpoints(folder) if is_complete(path, plan.run_id)]
    newest_step = checkpoint_step(complete[-1]) if complete else -1
    for path in checkpoints(folder):
        if ours and checkpoint_step(path) > newest_step and not is_complete(path, plan.run_id):
            plan.notes.append(f"Skipping {path.name}: not a complete checkpoint of this run (cut short while "
                              "saving, or not written by it).")
    if not complete and not ours:  # a folder of a plain Trainer, continued as asked (see `_adopt`)
        complete = [path for path in checkpoints(folder) if is_trainer_checkpoint(path)]
    elif not complete and plan.adopted:  # a run continuing one that has saved no checkpoint of its own yet
        complete = [folder / plan.adopted]
    newest = _newest_intact(complete, plan)
    if newest is None:
        if resume == LAST:
            raise ValueError(f"resume_from_checkpoint='last': output_dir {str(folder)!r} holds no complete, intact "
                             "checkpoint.")  # fmt: skip
        if any(True for _ in checkpoints(folder)):
            plan.notes.append("No complete checkpoint of this run yet: training starts at step 0.")
        return None
    if read_run_record(newest) is None:
        plan.adopted = newest.name
        plan.notes.append(f"Resuming from {newest} (a transformers Trainer checkpoint) with the settings given.")
    else:
        plan.notes.append(f"Resuming from {newest} (the newest complete checkpoint of this run).")
    return str(newest)


def _named_checkpoint(path: Path, plan: RunPlan) -> str:
    """--resume_from_checkpoint PATH: a complete checkpoint of this pipeline, or a plain Trainer checkpoint
    outside a folder of this pipeline; intact either way."""
    owner = read_run_record(path.parent)
    plain = read_run_record(path) is None and is_trainer_checkpoint(path) and not (owner and "run_id" in owner)
    if not (is_complete(path) or plain):
        raise ValueError(f"resume_from_checkpoint={str(path)!r} is not a complete checkpoint of this pipeline (no "
                         f"{RUN_RECORD_FILE} with a global_step: missing, or cut short while saving), nor a "
                         f"transformers Trainer checkpoint (with {TRAINER_STATE_NAME}) outside a run of this pipeline.")
    problem = damage(path)
    if problem is not None:
        raise ValueError(f"resume_from_checkpoint={str(path)!r} is damaged: {problem}. Name another checkpoint, or "
                         "pass 'last' to take the newest intact one.")  # fmt: skip
    return str(path)


def _newest_intact(candidates: list[Path], plan: RunPlan) -> Path | None:
    """The newest candidate whose files are intact; each damaged one is named, and no longer counts as
    complete, so that training rewrites it when it reaches its step again."""
    for path in reversed(candidates):
        problem = damage(path)
        if problem is None:
            return path
        plan.notes.append(f"WARNING: {path} is damaged ({problem}); not resuming from it. It no longer counts as a "
                          "complete checkpoint.")  # fmt: skip
        if read_run_record(path) is not None:
            unseal(path)
    return None


def _check_training_state(plan: RunPlan, allow_model_only: bool) -> None:
    """A checkpoint without optimizer, scheduler and RNG state changes training when resumed: refused, or
    resumed with a warning saying what is reset when the user allows it."""
    if not lacks_training_state(plan.resume_from):
        return
    reset = ("AdamW's moments start again from zero, the learning-rate schedule starts again from its first step "
             "(warm-up included) and the random state is not restored")  # fmt: skip
    if not allow_model_only:
        raise OutputDirError(
            f"{plan.resume_from} was saved with save_only_model=True: it holds the weights and the step but no "
            f"optimizer, scheduler or random state, so resuming from it changes training: {reset}. Add "
            "--allow_model_only_resume true to resume from it anyway, or --overwrite_output_dir true to start again."
        )
    plan.notes.append(f"WARNING: resuming from {plan.resume_from}, saved with save_only_model=True "
                      f"(--allow_model_only_resume): {reset}.")  # fmt: skip


def rotate(folder: str | Path, run_id: str, keep: int | None, protected: set[str],
           before_delete: Callable[[Path], None] = lambda path: None) -> list[Path]:
    """Delete the oldest complete checkpoints of run `run_id` beyond `keep`; never another run's, an
    incomplete one, or a protected one (the best). A checkpoint that cannot be deleted is left with a
    warning, as transformers does. Returns the deleted folders."""
    if not keep or keep <= 0:
        return []
    own = [path for path in checkpoints(folder) if is_complete(path, run_id)]
    deletable = [path for path in own[:-1] if str(path) not in protected]
    deleted = []
    for path in deletable[: max(len(own) - keep, 0)]:
        before_delete(path)
        logger.info("Deleting %s (save_total_limit=%d)", path, keep)
        try:
            unseal(path)  # first: a checkpoint deleted halfway must not count as complete
            shutil.rmtree(path)
        except OSError as error:
            logger.warning("Could not delete %s (save_total_limit=%d): %s. Training goes on; delete it by hand.",
                           path, keep, error)  # fmt: skip
            continue
        deleted.append(path)
    return deleted


@contextmanager
def naming_a_full_disk(folder: str | Path) -> Iterator[None]:
    """Re-raise a write that failed on a full disk as "no space left on DEVICE while writing PATH": torch.save
    says only 'basic_ios::clear: iostream error'. PATH is the file the error names, else the newest file in
    `folder` (the one being written) when `folder`'s file system is full."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:  # what torch, safetensors and open() raise
        message = _full_disk_message(Path(folder), error)
        if message is None:
            raise
        raise OSError(errno.ENOSPC, message) from error


FULL_BELOW_BYTES = 1 << 20  # after a write failed for want of space, less than this is left


def _full_disk_message(folder: Path, error: BaseException) -> str | None:
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    named = [e for e in chain if isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename]
    if named:
        return f"no space left on {_device(Path(named[0].filename).parent)} while writing {named[0].filename}"
    try:
        usage = os.statvfs(folder)
    except OSError:
        return None
    if usage.f_bavail * usage.f_frsize >= FULL_BELOW_BYTES:
        return None
    files = [path for path in folder.rglob("*") if path.is_file()]
    written = max(files, key=lambda path: path.stat().st_mtime_ns) if files else folder
    return f"no space left on {_device(folder)} while writing {written}"


def _device(folder: Path) -> str:
    """'DEVICE (mounted on MOUNT)' of the file system holding `folder`, from /proc/self/mounts."""
    path = os.path.realpath(folder)
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return f"the device holding {path}"
    mounts = [line.split()[:2] for line in lines if len(line.split()) >= 2]
    # Mount points are written with octal escapes for spaces (\040).
    mounts = [(device, point.encode().decode("unicode_escape")) for device, point in mounts]
    inside = [(device, point) for device, point in mounts if path == point or path.startswith(point.rstrip("/") + "/")]
    device, point = max(inside, key=lambda entry: len(entry[1]), default=("the device", "/"))
    return f"{device} (mounted on {point})"
