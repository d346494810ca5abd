"""Stopping on SIGTERM with a checkpoint (`--enable_jit_checkpoint true`), through the Trainer's own save.

transformers' `JITCheckpointCallback` calls `Trainer._save_checkpoint` itself, which no `on_save` callback
sees, so the checkpoint would never be sealed by the run record, and the run then ends as if it had
reached its last step. Here SIGTERM only asks for a save: at the end of the optimizer step under way the
Trainer saves as at any `save_steps` (the pipeline seals it in `on_save`) and stops; the pipeline then
reports a run stopped early (`RunStopped`, exit status 128 + SIGTERM) instead of a finished one, and the
same command resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import signal

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class RunStopped(Exception):
    """Training stopped before its last step; `exit_code` is what `scripts/train.py` exits with."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class SaveAndStopOnSigterm(TrainerCallback):
    """From `on_train_begin` to `on_train_end`, SIGTERM makes the Trainer save a checkpoint at the end of the
    current optimizer step (skipping an evaluation due then) and stop. A second SIGTERM changes nothing. In
    a distributed run the ranks agree at every step, so all save and stop at the same one, whichever of them
    got the signal first. Used as a context manager, it also puts the handler back when training raises."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        if not self.requested:
            logger.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping.")
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1 and torch.distributed.is_initialized():
            asked = torch.tensor([float(self.requested)], device=args.device)
            torch.distributed.all_reduce(asked, op=torch.distributed.ReduceOp.MAX)
            self.requested = bool(asked.item())
        if self.requested:
            control.should_evaluate = False
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put back the SIGTERM handler found at `on_train_begin`."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> SaveAndStopOnSigterm:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
