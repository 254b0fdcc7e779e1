"""Logs ``data/skipped``: corrupt samples dropped so far (shards, CUB/COCO folders), over workers and ranks."""

from __future__ import annotations

import lightning as L
import torch


class SkippedSamples(L.Callback):
    """Adds up the batches' ``skipped`` counts (see `galip.data.shards.count_skips`) and logs the total.

    Each loader worker counts its own skips and passes them on with its batches, so the total is exact with
    any ``num_workers``; the log reduces it over ranks. Batches without ``skipped`` (in-memory data) log
    nothing.
    """

    def __init__(self):
        self.total = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(batch, dict) or "skipped" not in batch:
            return
        self.total += int(batch["skipped"])
        value = torch.tensor(float(self.total), device=pl_module.device)
        pl_module.log("data/skipped", value, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="sum")

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total = int(state.get("total", 0))
