"""Exact data position on resume for in-memory (map-style) training data.

Lightning restores step, epoch and optimizers but not where a plain DataLoader was inside its epoch: a run
resumed mid-epoch would start the epoch's data over (with a new shuffle). Here the training order is a pure
function of (seed, epoch) and the data module records how many batches of the epoch were consumed, so the
resumed loader skips exactly those and the run sees the same batches as an uninterrupted one.

Streamed shards (resampled WebDataset) have no position to return to; they are reseeded instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from galip.data.batch import Loader, collate

log = logging.getLogger(__name__)


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` fixed by (seed, epoch); ``skip_once(k)`` drops its first k indices once.

    Lightning calls ``set_epoch`` at the start of every epoch (as for a DistributedSampler).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_once(self, n_indices: int) -> None:
        self._skip = n_indices

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(self.order()[skip:].tolist())

    def __len__(self) -> int:
        return self.n


class ResumableData:
    """Mixin for a LightningDataModule whose training loader uses `EpochShuffle` (see `train_sampler`).

    ``state_dict`` (saved in every checkpoint by Lightning) records the epoch and the batches of it already
    trained on; ``load_state_dict`` (called before the loaders are built on resume) arms the skip.
    """

    trainer: L.Trainer | None
    batch_size: int
    num_workers: int
    _resume_position: dict[str, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            return {}
        # `processed` counts the current batch once its training step ran: checkpoints are written after it.
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_position = dict(state) if state else None

    def train_sampler(self, n: int, seed: int) -> EpochShuffle | None:
        """The training sampler; ``None`` under DDP, where Lightning's DistributedSampler takes over."""
        world = self.trainer.world_size if self.trainer is not None else 1
        position, self._resume_position = self._resume_position, None
        if world > 1:
            if position and position.get("batches"):
                log.warning("DDP resume: the interrupted epoch's data order starts over (not resumable)")
            return None
        sampler = EpochShuffle(n, seed)
        if position and position.get("batches"):
            sampler.set_epoch(position["epoch"])
            sampler.skip_once(position["batches"] * self.batch_size)
        return sampler

    def map_loader(self, dataset: Dataset, seed: int, train: bool) -> DataLoader:
        """A loader over an in-memory (map-style) dataset: `train_sampler`'s resumable order for training,
        the dataset's order otherwise; uses the module's ``batch_size`` and ``num_workers``."""
        sampler = self.train_sampler(len(dataset), seed) if train else None
        return Loader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def stream_seed(self, seed: int) -> int:
        """Seed of a resampled (streamed) training set: a resumed run draws a fresh stream rather than
        replaying the samples the run began with."""
        position, self._resume_position = self._resume_position, None
        if not position:
            return seed
        return seed + 7919 * (position.get("epoch", 0) + 1) + position.get("batches", 0)
