"""A one-line status per tick and ``stats.jsonl`` beside the checkpoints (after NVlabs/edm's training loop)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from galip.callbacks.schedule import RENAMED_TO_KIMG, batches_done, kimg_due, renamed_to_kimg

SHOWN = ("d/loss", "g/loss", "d/magp", "g/sim")


class TrainingStatus(L.Callback):
    """Every N kimg: print ``kimg … s/kimg … img/s … losses … mem`` and append the same as JSON.

    Logs ``perf/images_per_s`` and ``perf/s_per_kimg`` too, so dashboards show throughput.

    Args:
        dirpath: where ``stats.jsonl`` goes (the checkpoint folder by default).
        every_n_kimg: the tick, in thousands of images; 0 disables the callback.
    """

    REMOVED_KEYS = RENAMED_TO_KIMG  # answered with their new spelling

    def __init__(self, dirpath: str | Path, every_n_kimg: float = 20, **removed):
        renamed_to_kimg("TrainingStatus", removed)
        self.dirpath, self.every_n_kimg = Path(dirpath), every_n_kimg
        self._t0: float | None = None
        self._images0 = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._images0 = time.perf_counter(), getattr(pl_module, "images_seen", 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not kimg_due(trainer, pl_module, batch, self.every_n_kimg) or self._t0 is None:
            return
        stats = self.tick(trainer, pl_module)
        pl_module.log_dict(
            {"perf/images_per_s": stats["images_per_s"], "perf/s_per_kimg": stats["s_per_kimg"]},
            on_step=True,
            on_epoch=False,
        )
        if trainer.is_global_zero:
            self.write(stats)

    def tick(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        now, images = time.perf_counter(), getattr(pl_module, "images_seen", 0)
        seconds, new_images = now - self._t0, max(images - self._images0, 1)
        self._t0, self._images0 = now, images
        metrics = trainer.callback_metrics
        return {
            "batch": batches_done(trainer),
            "kimg": images / 1000.0,
            "s_per_kimg": seconds / new_images * 1000.0,
            "images_per_s": new_images / max(seconds, 1e-9),
            **{k: float(metrics[k]) for k in SHOWN if k in metrics},
            "peak_mem_gb": peak_memory_gb(pl_module.device),
            "time": time.time(),
        }

    def write(self, stats: dict[str, Any]) -> None:
        losses = " ".join(f"{k} {stats[k]:.3f}" for k in SHOWN if k in stats)
        line = (
            f"kimg {stats['kimg']:.1f}  batch {stats['batch']}  s/kimg {stats['s_per_kimg']:.1f}  "
            f"img/s {stats['images_per_s']:.1f}  {losses}  mem {stats['peak_mem_gb']:.2f} GB"
        )
        print(line, file=sys.stderr, flush=True)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with open(self.dirpath / "stats.jsonl", "a") as f:
            f.write(json.dumps(stats) + "\n")


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20
