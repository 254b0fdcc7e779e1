"""Lightning's ModelCheckpoint, plus a final ``last.ckpt`` when training stops between save points."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` at the end of training.

    With ``every_n_train_steps`` and a ``max_steps`` that is not a multiple of it, Lightning's callback
    leaves ``last.ckpt`` at the previous save point, and the final steps (and the state a resume needs)
    would be lost.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self.dirpath and self._last_global_step_saved != trainer.global_step:
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            self.last_model_path = str(path)
            self._last_global_step_saved = trainer.global_step
