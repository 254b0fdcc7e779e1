"""The fixed-noise sample grids as images in the loggers that show pictures (W&B, TensorBoard), so a dashboard
shows training progress as the grids themselves; the PNG files stay the record."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from galip.callbacks.schedule import log_step

KEY = "samples/grid"


def log_grid_image(trainer: L.Trainer, path: str | Path, key: str = KEY) -> None:
    """``path`` (a grid PNG) as an image in each logger that takes images, at the step Lightning files the
    metrics of the batch just finished under (its index, from 0), whether drawn after a batch or at the end; the
    file name (which says when it was drawn) is its caption. Other loggers (CSV) are left alone."""
    path, step = Path(path), log_step(trainer)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step, caption=[path.stem])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, _rgb(path), global_step=step, dataformats="HWC")


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
