"""Lightning's ModelCheckpoint, saving every N kimg, plus a final ``last.ckpt`` when training stops between
save points or is stopped by SIGTERM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from galip.callbacks.schedule import batches_done, kimg_due, kimg_seen


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves every ``every_n_kimg`` thousand images seen (over all ranks) and also
    writes ``last.ckpt`` at the end of training.

    Lightning's own period keys (``every_n_train_steps`` counts optimizer steps, two per batch here) still
    work; the configs use kimg, like every other schedule. A run that stops between save points would
    otherwise leave ``last.ckpt`` at the previous one, and the final steps (and the state a resume needs) lost.
    """

    def __init__(self, *args: Any, every_n_kimg: float | None = None, **kwargs: Any):
        if every_n_kimg:  # the kimg period is the only one: no save at every epoch's end, Lightning's default
            kwargs.setdefault("every_n_epochs", 0)
        super().__init__(*args, **kwargs)
        self.every_n_kimg = every_n_kimg

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        due = kimg_due(trainer, pl_module, batch, self.every_n_kimg)
        stopping = stopping_for_sigterm(trainer)
        if not (due or stopping) or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if due:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _monitor_candidates(self, trainer: L.Trainer) -> dict[str, Any]:
        """Lightning's names for ``filename``, plus ``kimg`` (images seen) and ``batch`` (batches done): the
        counters a user sees everywhere else (``step`` is Lightning's optimizer-step count, two per batch)."""
        candidates = super()._monitor_candidates(trainer)
        candidates["kimg"] = torch.tensor(kimg_seen(trainer.lightning_module), dtype=torch.float64)
        candidates["batch"] = torch.tensor(batches_done(trainer))
        return candidates

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.dirpath and self._last_global_step_saved != trainer.global_step:
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path, weights_only=False)
            self.last_model_path = str(path)
            self._last_global_step_saved = trainer.global_step


def stopping_for_sigterm(trainer: L.Trainer) -> bool:
    """Whether Lightning will stop the run after this batch because the process got SIGTERM (a cluster's
    preemption, ``kill``, a job's time limit): then ``last.ckpt`` is written at this batch's end, like any
    periodic checkpoint, so a resume loses nothing. One process only: with several, the ranks could disagree
    about the signal at this point, and a save they do not all enter would hang (the last periodic checkpoint
    is what a resume has there)."""
    return trainer.received_sigterm and trainer.world_size == 1
