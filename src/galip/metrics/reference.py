"""FID reference statistics: ``mu``/``sigma`` of a real image set in ``.npz`` files, with a JSON manifest.

``python -m galip.metrics.reference_stats`` writes them (``mu``, ``sigma``, ``n`` and a ``.json`` manifest of
what was measured: extractor, weights file, data, split, N, pre-processing).

The DF-GAN family's ``*_FIDK0.npz`` files (keys ``mu``, ``sigma``, no manifest; docs/official_code.md) are read too. They
were made with torchvision's ImageNet Inception and the official input path, so they only pair with
``metrics.fid.extractor=dfgan_inception``; mixing statistics of two extractors is refused (docs/evaluation.md).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "galip-fid-reference/1"
DFGAN_EXTRACTOR = "dfgan_inception"


@dataclass
class ReferenceStats:
    """Gaussian statistics of a real image set in some feature space, and how they were made."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None  # None: the file does not say (DF-GAN family)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def extractor(self) -> str:
        return self.manifest.get("extractor", "unknown")

    def describe(self) -> str:
        n = "N unknown" if self.n is None else f"N={self.n}"
        where = self.manifest.get("data", {})
        data = (
            f"{where.get('name', '?')}/{where.get('split', '?')}"
            if where
            else self.manifest.get("source", "?")
        )
        return f"{self.manifest.get('path', '?')} ({data}, {n} real images, extractor {self.extractor})"


def manifest_path(npz: str | Path) -> Path:
    return Path(npz).with_suffix(".json")


def save_reference(path: str | Path, stats: ReferenceStats) -> Path:
    """Write ``path`` (.npz: mu, sigma, n) and its manifest ``path.with_suffix('.json')``."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics go to a .npz file, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, n=np.int64(-1 if stats.n is None else stats.n))
    tmp.replace(path)  # atomic: a half-written file never carries the final name
    manifest = {"format": FORMAT, **stats.manifest, "n": stats.n, "feature_dim": int(stats.mu.shape[0])}
    manifest_path(path).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return path


def load_reference(path: str | Path, extractor: str | None = None) -> ReferenceStats:
    """Read our files or a DF-GAN family ``*_FIDK0.npz``; ``extractor`` declares it for a file without manifest."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID reference statistics {path} do not exist (make them with "
            f"`python -m galip.metrics.reference_stats data=… out={path.name}`)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f.files and int(f["n"]) >= 0 else None
    except (KeyError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not an FID statistics file with 'mu' and 'sigma': {err}") from err
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a D-vector and a D×D matrix")
    manifest = _read_manifest(path, extractor)
    return ReferenceStats(mu, sigma, n, {**manifest, "path": str(path)})


def _read_manifest(path: Path, extractor: str | None) -> dict[str, Any]:
    if manifest_path(path).is_file():
        manifest = json.loads(manifest_path(path).read_text())
    elif path.stem.endswith("_FIDK0"):
        manifest = {"source": "DF-GAN family metadata", "extractor": DFGAN_EXTRACTOR}
    else:
        manifest = {"source": "no manifest"}
    if extractor is not None:
        manifest["extractor"] = extractor
    return manifest


def check_compatible(stats: ReferenceStats, extractor: str) -> None:
    """Refuse to compare features of two different networks (the number would mean nothing)."""
    if stats.extractor != extractor:
        raise ValueError(
            f"reference {stats.manifest.get('path')} holds {stats.extractor} statistics but this FID uses "
            f"{extractor}: set metrics.fid.extractor={stats.extractor} (or metrics.fid.reference_extractor=… "
            f"for a file without manifest)"
        )


def seed_fid(fid, stats: ReferenceStats) -> None:
    """Give a `FrechetDistance` these statistics as its real side (after `check_compatible`)."""
    check_compatible(stats, fid.extractor)
    fid.set_real_statistics(torch.from_numpy(stats.mu), torch.from_numpy(stats.sigma), stats.n)


@torch.no_grad()
def compute_reference(fid, loader, n: int | None, manifest: dict[str, Any]) -> ReferenceStats:
    """Statistics of the first ``n`` images of ``loader`` (all of them when ``n`` is None), one pass."""
    for batch in loader:
        images = batch["image"]
        if n is not None:
            images = images[: n - fid.n_real]
        if len(images):
            fid.update(images.to(fid.device), real=True)
        if n is not None and fid.n_real >= n:
            break
    mu, sigma, count = fid.real_statistics()
    stats_manifest = {
        **manifest,
        "extractor": fid.extractor,
        "images": "loader output in [-1, 1] quantised to uint8 (as a PNG holds it)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return ReferenceStats(mu.cpu().numpy(), sigma.cpu().numpy(), count, stats_manifest)
