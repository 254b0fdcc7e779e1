"""A callback for the DDP test: each rank writes what it trained on, the noise it draws and hashes of its weights
to a JSON file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 of every tensor of ``module``'s state, in order: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def networks(pl_module: L.LightningModule) -> dict[str, torch.nn.Module]:
    nets = {"generator": pl_module.generator, "discriminator": pl_module.discriminator}
    if pl_module.generator_ema is not None:
        nets["generator_ema"] = pl_module.generator_ema
    return nets


class RankProbe(L.Callback):
    def __init__(self, out: str):
        self.out, self.keys, self.skipped = Path(out), [], 0
        self.start: dict[str, str] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {name: weights_hash(net) for name, net in networks(pl_module).items()}

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
            "start_hashes": self.start,
            "end_hashes": {name: weights_hash(net) for name, net in networks(pl_module).items()},
            "adam_hashes": [
                hashlib.sha256(
                    b"".join(s["exp_avg_sq"].cpu().numpy().tobytes() for s in opt.state.values())
                ).hexdigest()
                for opt in trainer.optimizers
            ],
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
