"""When periodic callbacks fire: counted in batches across epochs, not per epoch."""

from __future__ import annotations

import lightning as L


def batches_done(trainer: L.Trainer) -> int:
    """Training batches finished so far, across epochs (restored on resume with the fit loop's state).

    ``batch_idx`` restarts at every epoch, so ``(batch_idx + 1) % n`` drifts whenever an epoch is not a
    multiple of ``n`` batches; the fit loop's total counter does not.
    """
    return trainer.fit_loop.epoch_loop.total_batch_idx + 1


def due(trainer: L.Trainer, every_n_batches: int) -> bool:
    """True on the batch that completes a multiple of ``every_n_batches`` (never when it is 0)."""
    return bool(every_n_batches) and batches_done(trainer) % every_n_batches == 0
