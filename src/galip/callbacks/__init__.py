"""Lightning callbacks: checkpoints, a progress bar over the run, fixed-seed sample grids, periodic evaluation, status line + stats.jsonl."""

from galip.callbacks.checkpoint import Checkpoint
from galip.callbacks.evaluation import PeriodicEvaluation
from galip.callbacks.progress import RunProgressBar
from galip.callbacks.sample_grid import SampleGrid
from galip.callbacks.skipped_samples import SkippedSamples
from galip.callbacks.status import TrainingStatus
from galip.metrics.protocol import FIDEvaluator  # where configs of earlier releases found it

__all__ = [
    "Checkpoint",
    "FIDEvaluator",
    "PeriodicEvaluation",
    "RunProgressBar",
    "SampleGrid",
    "SkippedSamples",
    "TrainingStatus",
]
