"""A small content-addressed cache for artefacts that the project's own commands produce.

An artefact (the embedded world's pretrained tiny CLIP, its judge, shard sets) is stored under
``<root>/<kind>/<key>/`` where ``key`` hashes the config that produced it, so a changed config never
silently reuses a stale artefact and an unchanged one is found again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from galip.config import to_plain


def cache_root() -> Path:
    """``$GALIP_CACHE`` or ``./.cache/galip``."""
    return Path(os.environ.get("GALIP_CACHE", Path.cwd() / ".cache" / "galip")).expanduser()


def config_key(config: Mapping[str, Any], length: int = 12) -> str:
    """Stable hash of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(to_plain(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


# Artefacts the repository ships (made by its own commands, a few MB), found before the cache.
SHIPPED_ROOT = Path(__file__).parent / "assets"


def artefact_dir(kind: str, config: Mapping[str, Any], root: str | os.PathLike | None = None) -> Path:
    """Where the artefact of ``kind`` produced by ``config`` lives (not created).

    A shipped copy with the same config key (``galip/world/assets/<kind>/<key>/``) wins, so a fresh clone can
    skip rebuilding it; ``GALIP_NO_SHIPPED=1`` ignores shipped copies (to rebuild from scratch).
    """
    key = config_key(config)
    shipped = SHIPPED_ROOT / kind / key
    if os.environ.get("GALIP_NO_SHIPPED", "0") in ("0", "") and (shipped / "config.json").is_file():
        return shipped
    return Path(root or cache_root()) / kind / key


def write_config(directory: Path, config: Mapping[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps(to_plain(config), indent=2, sort_keys=True, default=str)
    )
