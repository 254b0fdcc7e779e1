"""Library messages a galip user cannot act on, silenced by name: each with the reason it does not apply.

Warnings galip itself causes are fixed where they arise instead (e.g. checkpoints saved with an explicit
``weights_only``); what is left here comes from inside the libraries, for situations galip sets up on purpose.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, why it does not concern a galip user)
IGNORED_WARNINGS = (
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "the frozen CLIP is in eval mode by design",
    ),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "inside Lightning's own pytree helper"),
    (r"You passed in a `val_dataloader` but have no `validation_step`", "evaluation runs in callbacks"),
    (r"You defined a `validation_step` but have no `val_dataloader`", "the tiny CLIP validates after fit"),
)
# Warnings that only a resume in the run's own directory makes irrelevant (`silence_resume_noise`)
RESUME_WARNINGS = (
    (
        r"Checkpoint directory .* exists and is not empty",
        "a resume in place continues the checkpoints that are there (a new run in an old directory still warns)",
    ),
)
# (substring of a Lightning info line, why)
IGNORED_LOG_LINES = (
    ("litlogger", "an advertisement every Trainer prints"),
    ("`Trainer.fit` stopped: `max_steps=", "counts optimizer steps (two per batch); the run's kimg ended it"),
)
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text, _ in IGNORED_LOG_LINES)


_FILTER = _DropLines()


def silence_library_noise() -> None:
    """Install the filters above (idempotent); the entry points call it before building a Trainer."""
    for pattern, _ in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def silence_resume_noise() -> None:
    """Install the `RESUME_WARNINGS` filters; `galip.train` calls it when it resumes from a checkpoint."""
    for pattern, _ in RESUME_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
