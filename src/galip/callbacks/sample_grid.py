"""Fixed-seed sample grids: the same captions and the same noise at every evaluation, so runs compare by eye."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from galip.callbacks.grid_images import log_grid_image
from galip.callbacks.schedule import RENAMED_TO_KIMG, kimg_due, kimg_label, kimg_seen, renamed_to_kimg
from galip.sampling import save_grid

DEFAULT_CAPTIONS = (
    "a small red circle on a grey background",
    "a large blue square to the left of a small yellow triangle",
    "a bird with a red head and black wings",
    "a plate of food on a wooden table",
)


class SampleGrid(L.Callback):
    """Writes ``<dirpath>/kimg000012.800.png`` (named by the images seen) (rows = captions, written beside them; columns = fixed noises)
    every N kimg and at the end.

    Args:
        dirpath: where the PNGs go (the Hydra run directory's ``samples/`` by default).
        captions: fixed captions; ``None`` takes them from the first validation batch, else the defaults.
        n_per_caption: columns (noise vectors) per caption.
        every_n_kimg: thousands of images between grids; 0 writes only at the end of training.
        seed: seed of the fixed noise.
    """

    REMOVED_KEYS = RENAMED_TO_KIMG  # answered with their new spelling

    def __init__(
        self,
        dirpath: str | Path,
        captions: Sequence[str] | None = None,
        n_per_caption: int = 4,
        every_n_kimg: float = 0,
        seed: int = 0,
        max_captions: int = 8,
        **removed,
    ):
        renamed_to_kimg("SampleGrid", removed)
        self.dirpath = Path(dirpath)
        self.captions = list(captions) if captions else None
        self.n_per_caption, self.every_n_kimg = n_per_caption, every_n_kimg
        self.seed, self.max_captions = seed, max_captions
        self.last_path: Path | None = None

    def fixed_captions(self, trainer: L.Trainer) -> list[str]:
        if self.captions is None:
            self.captions = _captions_from_val(trainer) or list(DEFAULT_CAPTIONS)
        return self.captions[: self.max_captions]

    def fixed_noise(self, n_captions: int, nz: int) -> torch.Tensor:
        """The same noise column for every caption: row i, column j uses noise j."""
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.n_per_caption, nz, generator=gen)
        return noise.repeat(n_captions, 1)

    def write(self, trainer: L.Trainer, module: L.LightningModule) -> Path:
        captions = self.fixed_captions(trainer)
        rows = [c for c in captions for _ in range(self.n_per_caption)]
        images = module.generate(rows, self.fixed_noise(len(captions), module.generator.nz))
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.grid_path(module)
        save_grid(images.float().cpu(), path, self.n_per_caption, row_labels=captions)
        (self.dirpath / "captions.txt").write_text("\n".join(captions) + "\n")
        self.last_path = path
        log_grid_image(trainer, path)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if kimg_due(trainer, pl_module, batch, self.every_n_kimg) and trainer.is_global_zero:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # unless the last batch drew this very grid (a run length that is a multiple of every_n_kimg): the
        # loggers would show it twice
        if trainer.is_global_zero and self.last_path != self.grid_path(pl_module):
            self.write(trainer, pl_module)

    def grid_path(self, module: L.LightningModule) -> Path:
        return self.dirpath / f"{kimg_label(kimg_seen(module))}.png"


def _captions_from_val(trainer: L.Trainer) -> list[str] | None:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "val_dataloader"):
        return None
    try:
        batch = next(iter(datamodule.val_dataloader()))
    except (StopIteration, NotImplementedError, TypeError):
        return None
    return list(batch["caption"])
