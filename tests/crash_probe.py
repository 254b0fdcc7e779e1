"""Callbacks for the crash tests: `StallSave` stalls one checkpoint save half-written (tests/test_crash_resume.py);
`SignalAt` sends the run's own process SIGTERM or SIGINT at a given batch (tests/test_sigterm.py).

Added to a run with ``+callbacks.crash._target_=crash_probe.StallSave +callbacks.crash.at_save=N`` (``tests/`` on
PYTHONPATH). The N-th atomic write (`galip.atomic_io.atomic_path`) of this process writes its temporary file,
cuts it to half its size and sleeps before the rename: the test kills the process then, so a half-written file
lies beside the checkpoints, exactly as a kill in the middle of ``torch.save`` leaves one. Nothing else changes
(``at_save=0``: no stall), so runs with and without it train the same numbers.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L

from galip import atomic_io
from galip.callbacks.schedule import batches_done


class StallSave(L.Callback):
    def __init__(self, at_save: int = 0, seconds: float = 120.0):
        self.at_save, self.seconds, self.saves = at_save, seconds, 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.at_save:
            atomic_io.atomic_path = self.stalling(atomic_io.atomic_path)

    def stalling(self, atomic_path):
        @contextmanager
        def wrapped(path):
            with atomic_path(path) as tmp:
                yield tmp
                self.saves += 1
                if self.saves == self.at_save:
                    with open(tmp, "r+b") as f:
                        f.truncate(os.path.getsize(tmp) // 2)
                    Path(f"{tmp}.stalled").touch()  # tells the test where it stalls
                    time.sleep(self.seconds)

        return wrapped


class SignalAt(L.Callback):
    """A signal to this process as batch ``at_batch`` (1-based) starts: SIGTERM, as a cluster's preemption sends
    it while that batch runs, or SIGINT, as Ctrl+C does (``+callbacks.term._target_=crash_probe.SignalAt
    +callbacks.term.at_batch=N [+callbacks.term.name=SIGINT]``)."""

    def __init__(self, at_batch: int, name: str = "SIGTERM"):
        self.at_batch, self.signal = at_batch, getattr(signal, name)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if batches_done(trainer) == self.at_batch:  # it counts the batch that starts
            if self.signal == signal.SIGINT:  # as in a terminal, whatever the test runner's own setting
                signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), self.signal)
