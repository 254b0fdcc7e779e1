"""Evaluation during training: every N kimg the evaluators' numbers (a small-sample FID and CLIPSIM on real
data, or what a data world brings, e.g. the embedded world's judge), logged under ``eval/``, appended to
``evaluation.jsonl``, and ``best.ckpt`` kept next to ``last.ckpt``.

The evaluators are the ones ``galip.evaluate`` runs: callables ``(Subject) -> {name: value}``
(`galip.metrics.protocol`), so a number logged here and one printed there are the same measurement.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L

from galip.callbacks.schedule import batches_done, log_step
from galip.metrics.protocol import Evaluator, Subject, run_evaluators


# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------
class PeriodicEvaluation(L.Callback):
    """Every ``every_n_kimg`` thousand images seen (``pl_module.images_seen``, all ranks) and at the end of
    training: run the evaluators on rank zero, log their numbers as ``{prefix}{name}``, append them to
    ``<log_dir>/evaluation.jsonl`` and, when ``monitor`` improved, save ``<dirpath>/best.ckpt``.

    Args:
        evaluators: one evaluator, a list, or a dict of them (Hydra: one ``_target_`` per name), e.g.
            `galip.metrics.FIDEvaluator`; each is called with a `Subject` built from the module and the
            trainer's datamodule.
        every_n_kimg: evaluation period in kimg; 0 evaluates only at the end.
        prefix: put before every metric name (logs, ``evaluation.jsonl``, ``monitor``).
        monitor: the metric that decides ``best.ckpt`` (``None``: no best checkpoint); ``mode`` min or max.
        dirpath: where ``best.ckpt`` goes (default: the ModelCheckpoint's directory, beside ``last.ckpt``).
        log_dir: where ``evaluation.jsonl`` goes (default: ``dirpath``'s parent).
    """

    def __init__(
        self,
        evaluators: Evaluator | list[Evaluator] | dict[str, Evaluator],
        every_n_kimg: float = 10.0,
        prefix: str = "eval/",
        monitor: str | None = None,
        mode: str = "min",
        dirpath: str | Path | None = None,
        filename: str = "best.ckpt",
        log_dir: str | Path | None = None,
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.evaluators, self.every_n_kimg, self.prefix = evaluators, every_n_kimg, prefix
        self.monitor, self.mode = monitor, mode
        self.dirpath = Path(dirpath) if dirpath else None
        self.filename, self.log_dir = filename, Path(log_dir) if log_dir else None
        self.next_kimg = every_n_kimg
        self.best: float | None = None
        self.best_kimg: float | None = None
        self.last_metrics: dict[str, float] | None = None
        self._last_eval_kimg: float | None = None

    # -- bookkeeping ----------------------------------------------------------------------------
    def best_path(self, trainer: L.Trainer) -> Path:
        if self.dirpath is None:
            ckpt = trainer.checkpoint_callback
            base = (
                ckpt.dirpath
                if ckpt is not None and ckpt.dirpath
                else os.path.join(trainer.default_root_dir, "checkpoints")
            )
            self.dirpath = Path(base)
        return self.dirpath / self.filename

    def improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def state_dict(self) -> dict[str, Any]:
        return {"next_kimg": self.next_kimg, "best": self.best, "best_kimg": self.best_kimg}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_kimg, self.best, self.best_kimg = (
            state_dict["next_kimg"],
            state_dict["best"],
            state_dict["best_kimg"],
        )

    # -- one evaluation -------------------------------------------------------------------------
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        kimg = pl_module.images_seen / 1000.0
        metrics, better = {}, False
        if trainer.is_global_zero:
            scores = self.evaluate(trainer, pl_module)
            metrics = {f"{self.prefix}{k}": v for k, v in scores.items()}
            better = self._judge_improvement(metrics, kimg)
            self._append(trainer, kimg, metrics)
        self.last_metrics, self._last_eval_kimg = metrics, kimg
        # save_checkpoint is collective under DDP: every rank must take the same branch
        if trainer.strategy.broadcast(better, src=0):
            trainer.save_checkpoint(
                self.best_path(trainer), weights_only=False
            )  # a full, resumable checkpoint
        return metrics

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The evaluators' numbers for the module's generator now (no prefix, nothing written)."""
        subject = Subject(
            pl_module.generate,
            pl_module.generator.nz,
            pl_module.device,
            getattr(pl_module, "clip", None),
            getattr(trainer, "datamodule", None),
        )
        return run_evaluators(self.evaluators, subject)

    def _judge_improvement(self, metrics: dict[str, float], kimg: float) -> bool:
        if self.monitor is None:
            return False
        if self.monitor not in metrics:
            raise KeyError(f"PeriodicEvaluation.monitor={self.monitor!r} is not among {sorted(metrics)}")
        if not self.improved(metrics[self.monitor]):
            return False
        self.best, self.best_kimg = metrics[self.monitor], kimg
        return True

    def _append(self, trainer: L.Trainer, kimg: float, metrics: dict[str, float]) -> None:
        log_dir = self.log_dir or self.best_path(trainer).parent.parent
        log_dir.mkdir(parents=True, exist_ok=True)
        record = {"batch": batches_done(trainer), "kimg": kimg, "metrics": metrics, "best": self.best}
        with open(log_dir / "evaluation.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- Lightning hooks ------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every_n_kimg or pl_module.images_seen < round(self.next_kimg * 1000):
            return
        period = round(self.every_n_kimg * 1000)  # in images: 3 × 6.4 kimg must be due at 19,200 images
        self.next_kimg = (pl_module.images_seen // period + 1) * period / 1000.0
        metrics = self.run(trainer, pl_module)
        if trainer.is_global_zero:
            values = {**metrics, **({"eval/best": self.best} if self.best is not None else {})}
            # rank_zero_only: the other ranks never compute these, so nothing may wait for them
            pl_module.log_dict(values, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last_eval_kimg == pl_module.images_seen / 1000.0:
            return  # the last batch was just evaluated
        metrics = self.run(trainer, pl_module)
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # self.log is not allowed in on_train_end
                logger.log_metrics(metrics, step=log_step(trainer))
                logger.save()
