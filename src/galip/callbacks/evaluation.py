"""Evaluation during training: every N kimg a small-sample FID (or the judge's metrics on the embedded world),
logged, appended to ``evaluation.jsonl``, and ``best.ckpt`` kept next to ``last.ckpt``.

The evaluators are plain callables ``(trainer, pl_module) -> {name: value}`` so the same callback serves FID on
real data and the judge on the shapes world; both follow `galip.metrics.protocol`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L

from galip.clip import FrozenCLIP
from galip.data.shapes import ShapesWorld
from galip.metrics.clipsim import CLIPSimilarity
from galip.metrics.fid import FrechetDistance, make_fid, resolve_weights
from galip.metrics.judge import Judge, evaluate_generator, load_judge
from galip.metrics.protocol import score_generator
from galip.metrics.reference_stats import load_reference, seed_fid


# ---------------------------------------------------------------------------------------------
# Evaluators
# ---------------------------------------------------------------------------------------------
class FIDEvaluator:
    """Small-sample FID (+ CLIPSIM) of ``pl_module.generate`` on the datamodule's val (or test) captions.

    The real statistics are computed once (first evaluation) or come from ``reference`` (a .npz). Missing
    Inception weights fail when the callback is built, not hours into training.

    Args:
        n_samples: generated images per evaluation (small: FID is biased upwards at small N; compare runs at
            the same N only).
        extractor, inception_weights, download, reference, reference_extractor: as ``metrics.*`` of
            ``galip.evaluate``.
        clipsim: ``"model"`` scores with the model's own CLIP, ``None`` skips CLIPSIM, or a `FrozenCLIP`.
        split: ``val`` or ``test``.
    """

    def __init__(
        self,
        n_samples: int = 2048,
        batch_size: int = 64,
        extractor: str = "inception",
        inception_weights: str | None = None,
        download: bool = False,
        reference: str | None = None,
        reference_extractor: str | None = None,
        clipsim: str | FrozenCLIP | None = "model",
        judge_path: str | None = None,
        split: str = "val",
        seed: int = 0,
    ):
        if extractor != "judge":
            inception_weights = str(resolve_weights(extractor, inception_weights, download))
        self.n_samples, self.batch_size, self.split, self.seed = n_samples, batch_size, split, seed
        self.extractor, self.inception_weights, self.judge_path = extractor, inception_weights, judge_path
        self.reference = load_reference(reference, reference_extractor) if reference else None
        self.clipsim_choice = clipsim
        self._fid: FrechetDistance | None = None
        self._clipsim: CLIPSimilarity | None = None

    def metrics(self, pl_module: L.LightningModule) -> tuple[FrechetDistance, CLIPSimilarity | None]:
        if self._fid is None:
            judge = load_judge(self.judge_path) if self.extractor == "judge" else None
            self._fid = make_fid(self.extractor, self.inception_weights, judge=judge)
            if self.reference is not None:
                seed_fid(self._fid, self.reference)
            clip = pl_module.clip if self.clipsim_choice == "model" else self.clipsim_choice
            self._clipsim = CLIPSimilarity(clip) if clip is not None else None
        self._fid.to(pl_module.device)
        if self._clipsim is not None:
            self._clipsim.to(pl_module.device)
        return self._fid, self._clipsim

    def loader(self, trainer: L.Trainer):
        datamodule = trainer.datamodule
        return datamodule.val_dataloader() if self.split == "val" else datamodule.test_dataloader()

    def __call__(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        fid, clipsim = self.metrics(pl_module)
        nz = pl_module.generator.nz
        out = score_generator(
            pl_module.generate, self.loader(trainer), self.n_samples, nz, fid, clipsim, self.seed
        )
        return {f"eval/{k}": v for k, v in out.items()}


class JudgeEvaluator:
    """The judge's metrics (``judge/acc``, ``judge/fd``, …) on the first ``n_samples`` scenes of a split."""

    def __init__(
        self,
        judge_path: str | Path,
        n_samples: int = 256,
        batch_size: int = 64,
        split: str = "val",
        world_seed: int = 0,
        image_size: int = 64,
        seed: int = 0,
        max_objects: int = 3,
    ):
        self.judge_path, self.n_samples, self.batch_size, self.seed = judge_path, n_samples, batch_size, seed
        self.world = ShapesWorld(world_seed, split, n_samples, image_size, max_objects)
        self._judge: Judge | None = None

    def __call__(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        if self._judge is None:
            self._judge = load_judge(self.judge_path)
        judge = self._judge.to(pl_module.device)
        nz = pl_module.generator.nz
        return evaluate_generator(
            pl_module.generate, self.world, judge, self.n_samples, self.batch_size, self.seed, nz
        )


# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------
class PeriodicEvaluation(L.Callback):
    """Every ``every_n_kimg`` thousand images seen (``pl_module.images_seen``, all ranks) and at the end of
    training: run ``evaluator`` on rank zero, log its numbers, append them to ``<log_dir>/evaluation.jsonl``
    and, when ``monitor`` improved, save ``<dirpath>/best.ckpt``.

    Args:
        evaluator: ``(trainer, pl_module) -> dict``, e.g. `FIDEvaluator` or `JudgeEvaluator`.
        every_n_kimg: evaluation period in kimg; 0 evaluates only at the end.
        monitor: the metric that decides ``best.ckpt`` (``None``: no best checkpoint); ``mode`` min or max.
        dirpath: where ``best.ckpt`` goes (default: the ModelCheckpoint's directory, beside ``last.ckpt``).
        log_dir: where ``evaluation.jsonl`` goes (default: ``dirpath``'s parent).
    """

    def __init__(
        self,
        evaluator,
        every_n_kimg: float = 10.0,
        monitor: str | None = None,
        mode: str = "min",
        dirpath: str | Path | None = None,
        filename: str = "best.ckpt",
        log_dir: str | Path | None = None,
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.evaluator, self.every_n_kimg, self.monitor, self.mode = evaluator, every_n_kimg, monitor, mode
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
            metrics = self.evaluator(trainer, pl_module)
            better = self._judge_improvement(metrics, kimg)
            self._append(trainer, kimg, metrics)
        self.last_metrics, self._last_eval_kimg = metrics, kimg
        # save_checkpoint is collective under DDP: every rank must take the same branch
        if trainer.strategy.broadcast(better, src=0):
            trainer.save_checkpoint(self.best_path(trainer))
        return metrics

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
        record = {"step": trainer.global_step, "kimg": kimg, "metrics": metrics, "best": self.best}
        with open(log_dir / "evaluation.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- Lightning hooks ------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        kimg = pl_module.images_seen / 1000.0
        if not self.every_n_kimg or kimg < self.next_kimg:
            return
        self.next_kimg = (math.floor(kimg / self.every_n_kimg) + 1) * self.every_n_kimg
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
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
