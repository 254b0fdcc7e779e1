"""When periodic things happen: everything is scheduled in kimg (thousands of images seen over all ranks), so
runs with different batch sizes and GPU counts compare; optimizer-step counts are derived from it."""

from __future__ import annotations

import math
from typing import Any

import lightning as L


def batch_images(trainer: L.Trainer, batch: Any) -> int:
    """Images this batch added over all ranks."""
    images = batch["image"] if isinstance(batch, dict) else batch[0]
    return len(images) * trainer.world_size


def kimg_due(
    trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, every_n_kimg: float | None
) -> bool:
    """True on the batch that crosses a multiple of ``every_n_kimg`` (never when it is 0 or None).

    Stateless: it compares the images seen before and after this batch, so it holds across resumes and for any
    batch size (``pl_module.images_seen`` is checkpointed)."""
    if not every_n_kimg:
        return False
    period = max(1, round(every_n_kimg * 1000))
    after = getattr(pl_module, "images_seen", 0)
    before = after - batch_images(trainer, batch)
    return after // period > before // period


def set_run_length(trainer: L.Trainer, kimg: float, batch_size: int) -> int:
    """Train for ``kimg`` thousand images: the optimizer-step count (two per batch) is derived from the
    per-rank batch size and the number of ranks, and set as the Trainer's ``max_steps`` (epochs unlimited)."""
    batches = math.ceil(kimg * 1000 / (batch_size * trainer.world_size))
    trainer.fit_loop.epoch_loop.max_steps = 2 * batches
    trainer.fit_loop.max_epochs = -1
    return 2 * batches


def kimg_seen(pl_module: L.LightningModule) -> float:
    """Thousands of images seen over all ranks: the run's clock (checkpointed with the module)."""
    return getattr(pl_module, "images_seen", 0) / 1000.0


def kimg_label(kimg: float) -> str:
    """``kimg000051.200``: file names that sort in training order (up to a million kimg)."""
    return f"kimg{kimg:010.3f}"


def batches_done(trainer: L.Trainer) -> int:
    """Training batches finished so far, across epochs (restored on resume with the fit loop's state)."""
    return trainer.fit_loop.epoch_loop.total_batch_idx + 1


def log_step(trainer: L.Trainer) -> int:
    """The step loggers file the last finished batch's values under: Lightning counts batches from 0 there."""
    return max(batches_done(trainer) - 1, 0)


RENAMED_TO_KIMG = ("every_n_batches",)  # keys of earlier releases that `renamed_to_kimg` answers


def renamed_to_kimg(owner: str, removed: dict[str, Any]) -> None:
    """``every_n_batches`` of earlier releases: one line naming the new key."""
    if "every_n_batches" in removed:
        raise TypeError(
            f"{owner}: every_n_batches is now every_n_kimg (thousands of images seen over all ranks)"
        )
    if removed:
        raise TypeError(f"{owner} got unexpected arguments {sorted(removed)}")
