"""Pretrain the shapes world's own CLIP: ``python -m galip.world.pretrain_clip +experiment=shapes_clip``.

The artefact lands in the cache keyed by what determines the weights (`galip.world.tiny_clip`); a second run
with the same settings finds it instead of training again (``cache.force=true`` retrains).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from galip.config import normalize_slot_overrides
from galip.world.tiny_clip import ensure


@hydra.main(version_base="1.3", config_path="conf/pretrain", config_name="clip")
def main(cfg: DictConfig) -> float:
    path = ensure(cfg)
    return float(json.loads((path.parent / "metrics.json").read_text())["i2t_top1"])


if __name__ == "__main__":
    sys.argv = normalize_slot_overrides(sys.argv)
    main()
