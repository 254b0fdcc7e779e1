"""Periodic judging of the generator on the embedded shapes world (attribute accuracy and judge-FD)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from galip.callbacks.schedule import due
from galip.data.shapes import ShapesWorld
from galip.metrics.judge import Judge, evaluate_generator, load_judge


class JudgeEvaluation(L.Callback):
    """Every N training batches and at the end of training: score ``pl_module.generate`` with the judge.

    Logs ``judge/*`` (see `galip.metrics.judge.attribute_accuracy` and ``judge/fd``) and appends one line
    ``{"step", "kimg", "metrics"}`` to ``<dirpath>/judge_metrics.jsonl``. Runs on rank zero only; the judge
    is loaded once, on first use, onto the module's device.

    Args:
        judge_path: a ``judge.pt`` written by `galip.train_judge` (``None``: `ensure_judge()`'s default).
        every_n_batches: 0 evaluates only at the end of training.
        n_samples: val scenes judged (one image each).
        batch_size: generation batch size.
        dirpath: where ``judge_metrics.jsonl`` goes.
        seed: seed of the generator noise (the same noise at every evaluation).
        world_seed, image_size, max_objects: the val world the captions and real images come from (the
            data's ``max_objects``, so a run is judged on the kind of scene it trains on).
    """

    def __init__(
        self,
        judge_path: str | Path | None = None,
        every_n_batches: int = 1000,
        n_samples: int = 512,
        batch_size: int = 64,
        dirpath: str | Path = ".",
        seed: int = 0,
        world_seed: int = 0,
        image_size: int = 64,
        max_objects: int = 3,
    ):
        self.judge_path = judge_path
        self.every_n_batches, self.n_samples, self.batch_size = every_n_batches, n_samples, batch_size
        self.dirpath, self.seed = Path(dirpath), seed
        self.world = ShapesWorld(world_seed, "val", n_samples, image_size, max_objects)
        self._judge: Judge | None = None
        self.last_metrics: dict[str, float] | None = None
        self._evaluated_at: int | None = None

    def judge(self, device: torch.device) -> Judge:
        if self._judge is None:
            if self.judge_path is None:
                from galip.train_judge import ensure_judge  # trains on first use when nothing is cached

                self.judge_path = ensure_judge()
            self._judge = load_judge(self.judge_path)
        return self._judge.to(device)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        nz = getattr(getattr(pl_module, "generator", None), "nz", 100)
        metrics = evaluate_generator(
            pl_module.generate,
            self.world,
            self.judge(pl_module.device),
            n=self.n_samples,
            batch_size=self.batch_size,
            seed=self.seed,
            nz=nz,
        )
        self.last_metrics, self._evaluated_at = metrics, trainer.global_step
        self._append(trainer.global_step, getattr(pl_module, "images_seen", 0) / 1000.0, metrics)
        return metrics

    def _append(self, step: int, kimg: float, metrics: dict[str, float]) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with open(self.dirpath / "judge_metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "kimg": kimg, "metrics": metrics}) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not due(trainer, self.every_n_batches):
            return
        if trainer.is_global_zero:
            metrics = self.evaluate(trainer, pl_module)
            # rank_zero_only: the other ranks never compute these, so nothing may wait for them
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or self._evaluated_at == trainer.global_step:
            return  # the last periodic evaluation already scored this exact state
        metrics = self.evaluate(trainer, pl_module)
        for logger in trainer.loggers:  # self.log is not allowed in on_train_end
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
