"""One progress bar over the whole run, counted in batches and labelled in kimg (Lightning's bar restarts at
every epoch, which says little when the run length is kimg and an epoch is whatever the data happens to be)."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from galip.callbacks.schedule import batches_done, kimg_seen


def run_batches(trainer: L.Trainer) -> int | None:
    """Batches in the whole run: from ``max_steps`` (two optimizer steps per batch), else epochs × batches."""
    max_steps = trainer.fit_loop.epoch_loop.max_steps
    if max_steps not in (-1, None):
        return max_steps // 2
    per_epoch, epochs = trainer.num_training_batches, trainer.max_epochs
    if epochs in (-1, None) or per_epoch == float("inf"):
        return None
    return int(per_epoch * epochs)


class RunProgressBar(TQDMProgressBar):
    """``kimg 12.8/51.2: 25%|██▌ | 400/1600 [01:10<03:30, 5.7it/s, d_loss=…, g_loss=…]``: the batches of the
    whole run; a resumed run starts where its checkpoint stopped.

    Args:
        kimg: the run length shown after the images seen (the root config's ``kimg``; None shows none).
        refresh_rate: redraw every N batches.
    """

    def __init__(self, kimg: float | None = None, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.kimg = kimg
        decimals = len(f"{kimg:g}".partition(".")[2]) if kimg else 1
        self._digits = max(decimals, 1)

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self._description(self.trainer.lightning_module),
            total=run_batches(self.trainer),
            # a resumed run's batches so far (two optimizer steps each)
            initial=self.trainer.global_step // 2,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the run: nothing restarts with an epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, bar = batches_done(trainer), self.train_progress_bar
        if bar is not None and not bar.disable and self._should_update(n, bar.total):
            bar.n = n
            bar.set_description(self._description(pl_module), refresh=False)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: always empty here
        return metrics

    def _description(self, pl_module: L.LightningModule) -> str:
        end = f"/{self.kimg:g}" if self.kimg else ""
        return f"kimg {kimg_seen(pl_module):.{self._digits}f}{end}"
