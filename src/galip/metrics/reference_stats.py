"""FID reference statistics of a data split: ``python -m galip.metrics.reference_stats data=coco split=test
out=coco_test_inception.npz`` writes ``coco_test_inception.npz`` (``mu``, ``sigma``, ``n``) and its manifest
``coco_test_inception.json``; ``show=FILE.npz`` prints what a file holds (ours or a DF-GAN ``*_FIDK0.npz``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from open_clip import SimpleTokenizer

from galip import __version__
from galip.config import data_name, fid_features, register_resolvers
from galip.metrics.fid import make_fid
from galip.metrics.reference import compute_reference, load_reference, manifest_path, save_reference


def show(path: str | Path) -> str:
    stats = load_reference(path)
    lines = [stats.describe(), f"  mu {stats.mu.shape}, sigma {stats.sigma.shape}"]
    lines += [f"  {k}: {v}" for k, v in sorted(stats.manifest.items()) if k != "path"]
    return "\n".join(lines)


def make_reference(cfg: DictConfig) -> Path:
    """Build the FID metric and the data split of ``cfg`` and write the statistics file."""
    metrics = cfg.metrics
    fid = make_fid(
        metrics.fid.extractor,
        metrics.get("inception_weights"),
        bool(metrics.get("download", False)),
        antialias=bool(metrics.fid.get("antialias", False)),
        features=fid_features(metrics),
    ).to(cfg.device)
    datamodule = instantiate(cfg.data, tokenizer=SimpleTokenizer())
    datamodule.setup("validate" if cfg.split == "val" else "test")
    loader = datamodule.val_dataloader() if cfg.split == "val" else datamodule.test_dataloader()
    manifest = {
        "data": {
            "name": data_name(cfg),
            "target": cfg.data._target_,
            "split": cfg.split,
            "image_size": cfg.data.get("image_size"),
        },
        "weights": metrics.get("inception_weights"),
        "galip_version": __version__,
    }
    stats = compute_reference(fid, loader, cfg.n, manifest)
    out = save_reference(cfg.out, stats)
    print(
        f"reference statistics of {stats.n} {manifest['data']['name']}/{cfg.split} images "
        f"({fid.extractor}) -> {out} (+ {manifest_path(out).name})"
    )
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="reference_stats")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.get("show"):
            print(show(cfg.show))
            return
        if not cfg.get("out"):
            raise ValueError("out=PATH.npz is required (or show=PATH.npz to inspect a file)")
        make_reference(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"galip: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    register_resolvers()
    main()
