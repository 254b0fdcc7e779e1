"""Lightning callbacks: checkpoints, fixed-seed sample grids, periodic evaluation, status line + stats.jsonl."""

from galip.callbacks.checkpoint import Checkpoint
from galip.callbacks.evaluation import FIDEvaluator, JudgeEvaluator, PeriodicEvaluation
from galip.callbacks.judge_eval import JudgeEvaluation
from galip.callbacks.sample_grid import SampleGrid
from galip.callbacks.skipped_samples import SkippedSamples
from galip.callbacks.status import TrainingStatus

__all__ = [
    "Checkpoint",
    "FIDEvaluator",
    "JudgeEvaluation",
    "JudgeEvaluator",
    "PeriodicEvaluation",
    "SampleGrid",
    "SkippedSamples",
    "TrainingStatus",
]
