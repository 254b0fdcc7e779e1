"""Lightning's loggers, with a resumed run's CSV continued instead of started again, and no W&B warning that
no galip user can act on."""

from __future__ import annotations

import csv
from typing import Any

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` (with a warning) when a run starts in its
    directory. This one keeps it: the first rows a run writes replace the old rows from their first step on
    (those a crashed run logged after the checkpoint it is resumed from), and the earlier rows stay."""

    def _check_log_dir_exists(self) -> None:
        self._resumed_rows = self._read_rows() if self._fs.isfile(self.metrics_file_path) else None

    def _read_rows(self) -> list[dict[str, Any]]:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            return list(csv.DictReader(f))

    def save(self) -> None:
        if self._resumed_rows is not None and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            kept = [row for row in self._resumed_rows if _step(row) < first]
            self.metrics_keys = sorted({k for row in kept for k in row} | set(self.metrics_keys))
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._resumed_rows = None
        super().save()


def _step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        # unreadable: compares False, so the row is dropped with the rows it may belong to
        return float("nan")


class CSVLogger(LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose ``metrics.csv`` survives a resume (see ContinuingWriter)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` without the ``anonymous=None`` it always hands to
    ``wandb.init``: W&B answers it with a deprecation warning ("The anonymous setting has no effect") on
    every run, which no galip user can act on. ``anonymous=True`` is still passed on."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
