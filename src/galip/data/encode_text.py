"""Compute every caption's sentence vector once: ``python -m galip.data.encode_text <training overrides>``.

Takes the same overrides as ``python -m galip.train`` (``+experiment=cub``, ``clip=...``, ``data.root=...``),
so the vectors come from exactly the CLIP that training will load, and writes them where the data module
finds them: CUB/COCO ``<root>/sent_emb/<split>-<fingerprint>.pt``; shards get a
``{key}.sent-<fingerprint>.npy`` member (local shards are rewritten in place). The fingerprint hashes the
text tower's weights, so another CLIP never reads these vectors. Options before the overrides:
``--batch-size N`` (default 256) and ``--device cuda``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from galip.config import compose
from galip.data.paper_layout import missing_data_cause
from galip.data.webdataset import quote_shard_patterns

log = logging.getLogger("galip.encode_text")


def compose_train_config(overrides: list[str]) -> DictConfig:
    """The training config for these overrides, composed as the entry point composes it."""
    return compose("train", quote_shard_patterns(overrides))


def encode(cfg: DictConfig, batch_size: int = 256, device: str = "cpu") -> list:
    """Build CLIP and data as training does (same seed first: a random-init CLIP comes out identical)."""
    L.seed_everything(cfg.seed, verbose=False)
    clip = instantiate(cfg.clip).to(device)
    datamodule = instantiate(cfg.data, tokenizer=clip.tokenizer)
    if not hasattr(datamodule, "encode_sentences"):
        raise ValueError(f"{cfg.data._target_} has no sentence-vector cache (CUB/COCO folders and shards do)")
    return datamodule.encode_sentences(clip, batch_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m galip.data.encode_text", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        written = encode(compose_train_config(overrides), args.batch_size, args.device)
    except Exception as err:
        missing = missing_data_cause(err)
        if missing is None:
            raise
        print(f"galip: data missing: {missing}", file=sys.stderr)
        return 2
    for path in written:
        print(f"sentence vectors: {path}")
    print(f"{len(written)} file(s) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
