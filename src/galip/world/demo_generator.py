"""The shipped demo generator: `make demo`'s trained G (32 px, the demo world), so sampling and the web page work
on a fresh clone without training. ``assets/generator/demo/README.md`` has the command that made it, its scores
and its sha256. Like every export of a run on a shipped CLIP, it names that CLIP inside the package
(``galip:world/assets/clip/<key>/clip.pt``), so it loads offline wherever the package lives.
"""

from __future__ import annotations

from pathlib import Path

from galip.checkpoints import build_generator
from galip.models import Generator
from galip.world.cache import SHIPPED_ROOT

DEMO_GENERATOR = SHIPPED_ROOT / "generator" / "demo" / "generator.safetensors"


def load_demo_generator(export: str | Path = DEMO_GENERATOR) -> Generator:
    """The shipped demo G (frozen, eval mode) with its shipped CLIP; no network, no training."""
    return build_generator(export)
