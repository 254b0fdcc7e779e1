"""The paper's metrics: FID (torchmetrics, any feature extractor) and CLIPSIM, the protocol that runs them,
and FID reference statistics."""

from galip.metrics.clipsim import CLIPSimilarity
from galip.metrics.fid import FrechetDistance, make_fid
from galip.metrics.protocol import Evaluator, FIDEvaluator, Subject, run_evaluators, score_generator

__all__ = [
    "CLIPSimilarity",
    "Evaluator",
    "FIDEvaluator",
    "FrechetDistance",
    "Subject",
    "make_fid",
    "run_evaluators",
    "score_generator",
]
