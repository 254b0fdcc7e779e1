"""Metrics. `judge`: an independent classifier for the embedded shapes world (attribute accuracy, judge-FD)."""

from galip.metrics.judge import (
    ATTRIBUTES,
    VOCAB,
    Judge,
    JudgeFD,
    JudgeFeatures,
    attribute_accuracy,
    evaluate_generator,
    evaluate_judge,
    judge_loss,
    load_judge,
    save_judge,
    train_judge,
)

__all__ = [
    "ATTRIBUTES",
    "VOCAB",
    "Judge",
    "JudgeFD",
    "JudgeFeatures",
    "attribute_accuracy",
    "evaluate_generator",
    "evaluate_judge",
    "judge_loss",
    "load_judge",
    "save_judge",
    "train_judge",
]
