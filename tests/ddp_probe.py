"""A callback for the DDP test: each rank writes what it trained on and the noise it draws to a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RankProbe(L.Callback):
    def __init__(self, out: str):
        self.out, self.keys, self.skipped = Path(out), [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys.append(list(batch["key"]))
        self.skipped += int(batch.get("skipped", 0))

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "batches": len(self.keys),
            "keys": self.keys,
            "skipped": self.skipped,
            "noise": pl_module.noise(4).tolist(),
            "images_seen": pl_module.images_seen,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
