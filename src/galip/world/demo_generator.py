"""The shipped demo generator: `make demo`'s trained G (32 px, the demo world), so sampling and the web page work
on a fresh clone without training. ``assets/generator/demo/README.md`` has the command that made it, its scores
and its sha256.

An export names its CLIP by the file it was trained with (an absolute path in the clone that trained it); the
shipped one is relocated to this installation's shipped copy of that CLIP (same config key), so it loads offline
wherever the package lives.
"""

from __future__ import annotations

from pathlib import Path

from galip.checkpoints import build_generator, read_export
from galip.clip import load_clip
from galip.models import Generator
from galip.world.cache import SHIPPED_ROOT

DEMO_GENERATOR = SHIPPED_ROOT / "generator" / "demo" / "generator.safetensors"


def shipped_clip_path(clip_spec: dict) -> Path:
    """This installation's shipped copy of the CLIP a demo run was trained with (``clip_spec["path"]`` is
    ``…/assets/clip/<key>/clip.pt`` wherever that run's clone was)."""
    key = Path(clip_spec["path"]).parent.name
    path = SHIPPED_ROOT / "clip" / key / "clip.pt"
    if not path.is_file():
        raise FileNotFoundError(f"the shipped CLIP {key} is not in {SHIPPED_ROOT / 'clip'}")
    return path


def load_demo_generator(export: str | Path = DEMO_GENERATOR) -> Generator:
    """The shipped demo G (frozen, eval mode) with its shipped CLIP; no network, no training."""
    _, meta = read_export(export)
    clip = load_clip(**{**meta["clip"], "path": str(shipped_clip_path(meta["clip"]))})
    return build_generator(export, clip=clip)
