"""Lightning callbacks: fixed-seed sample grids (more to come: EMA, periodic evaluation)."""

from galip.callbacks.judge_eval import JudgeEvaluation
from galip.callbacks.sample_grid import SampleGrid

__all__ = ["JudgeEvaluation", "SampleGrid"]
