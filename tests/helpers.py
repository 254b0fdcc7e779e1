"""Shared test helpers: the real config composed, tiny runs and trainers, tiny datasets in real layouts.

Fixtures live in ``conftest.py``; plain functions live here and are imported as ``from tests.helpers import …``.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from hydra.utils import instantiate
from PIL import Image

from galip.config import CONF_DIR, compose
from galip.loading import build_module
from galip.module import GALIPModule

TINY_CLIP_CFG: dict = yaml.safe_load((CONF_DIR / "clip" / "tiny.yaml").read_text())["model_cfg"]
WORLD_CONF_DIR = CONF_DIR.parent / "world" / "conf"  # the embedded world's configs, on the search path too
CONF_DIRS = (CONF_DIR, WORLD_CONF_DIR)


def config_names(group: str) -> list[str]:
    """The options of a config group, wherever on the search path they live (framework or world)."""
    return sorted({p.stem for d in CONF_DIRS for p in (d / group).glob("*.yaml")})


def config_file(group: str, name: str) -> Path:
    return next(p for d in CONF_DIRS if (p := d / group / f"{name}.yaml").is_file())


# ---------------------------------------------------------------------------------------------
# The real config and entry points
# ---------------------------------------------------------------------------------------------
def compose_config(overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None):
    """The real ``train`` config composed as the entry point composes it (`galip.config.compose`).

    ``${hydra:runtime.output_dir}`` does not exist outside ``@hydra.main``, so ``paths.output_dir`` is always
    overridden.
    """
    output_dir = output_dir if output_dir is not None else "outputs/test"
    return compose("train", [*overrides, f"paths.output_dir={output_dir}"])


def run_module(
    module: str, args: Sequence[str], root: Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from ``root`` with outputs under it, offline (``env``: extra variables)."""
    env = {**os.environ, "GALIP_ROOT": str(root), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **env}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_in(cfg, directory: str | os.PathLike) -> None:
    """``galip.train.train(cfg)`` from inside ``directory`` (as a Hydra run starts in its run dir), cwd restored."""
    from galip.train import train

    cwd = os.getcwd()
    os.chdir(directory)
    try:
        train(cfg)
    finally:
        os.chdir(cwd)


def patch_rgb(image: Image.Image, xy: tuple[float, float], radius: int = 1):
    """Mean RGB (float32) of the (2r+1)² pixels around the fractional position ``xy`` of ``image``."""
    x, y = (round(c * image.width) for c in xy)
    pixels = np.asarray(image, dtype=np.float32)
    return pixels[y - radius : y + radius + 1, x - radius : x + radius + 1].reshape(-1, 3).mean(0)


def run_train(args: Sequence[str], root: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m galip.train ARGS`` from ``root`` with outputs under it, offline."""
    return run_module("galip.train", args, root, timeout)


# ---------------------------------------------------------------------------------------------
# Tiny GALIP modules and trainers
# ---------------------------------------------------------------------------------------------
def smoke_cfg(output_dir):
    return compose_config(["+experiment=smoke"], output_dir=output_dir)


def build(cfg, seed: int = 0) -> tuple[GALIPModule, L.LightningDataModule]:
    """Like galip.train.train, minus the Trainer: tiny CLIP + small G/D from the smoke experiment."""
    torch.manual_seed(seed)
    clip = instantiate(cfg.clip)
    module = build_module(cfg, clip)
    return module, instantiate(cfg.data, tokenizer=clip.tokenizer)


def one_batch_trainer(precision: str | None = "32", **kw) -> L.Trainer:
    """max_steps counts optimizer steps: two per batch (D and G), so 2 = one batch.

    ``precision=None`` leaves precision to a plugin passed in ``kw``."""
    if precision is not None:
        kw["precision"] = precision
    return L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kw,
    )


RED, BLUE = (230, 20, 20), (20, 20, 230)


def jpeg(size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> bytes:
    """A blue JPEG with a red rectangle (x, y, w, h): the bounding box, so crops are checkable."""
    image = Image.new("RGB", size, BLUE)
    if box is not None:
        x, y, w, h = box
        image.paste(RED, (x, y, x + w, y + h))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def captions_of(key: str, n: int = 3) -> list[str]:
    return [f"caption {i} of {key.rsplit('/', 1)[-1].lower()}" for i in range(n)]


def write_split(root: Path, split: str, keys: list[str]) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / split / "filenames.pickle").write_bytes(pickle.dumps(keys, protocol=2))


def write_texts(root: Path, keys: list[str]) -> None:
    for key in keys:
        path = root / "text" / f"{key}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(captions_of(key)) + "\n\n")  # a trailing empty line is not a caption


CUB_BOXES = {0: (40, 30, 60, 40), 1: (10, 10, 50, 70), 2: (100, 5, 40, 40)}


def make_cub(root: Path, n_train: int = 4, n_test: int = 2) -> dict[str, list[str]]:
    keys = [f"00{1 + i % 2}.Bird_{i % 2}/Bird_{i % 2}_00{i}_{100 + i}" for i in range(n_train + n_test)]
    images, boxes = [], []
    for i, key in enumerate(keys):
        box = CUB_BOXES[i % 3]
        path = root / "CUB_200_2011" / "images" / f"{key}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg((160, 120), box))
        images.append(f"{i + 1} {key}.jpg")
        boxes.append(f"{i + 1} {' '.join(f'{v:.1f}' for v in box)}")
    (root / "CUB_200_2011" / "images.txt").write_text("\n".join(images) + "\n")
    (root / "CUB_200_2011" / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    write_texts(root, keys)
    splits = {"train": keys[:n_train], "test": keys[n_train:]}
    for split, split_keys in splits.items():
        write_split(root, split, split_keys)
    return splits


def make_coco(root: Path, jpg_level: bool = True) -> dict[str, list[str]]:
    splits = {
        "train": [f"COCO_train2014_{i:012d}" for i in range(3)],
        "test": [f"COCO_val2014_{i:012d}" for i in range(2)],
    }
    for split, keys in splits.items():
        folder = root / "images" / ("train2014" if split == "train" else "val2014")
        folder = folder / "jpg" if jpg_level else folder
        folder.mkdir(parents=True, exist_ok=True)
        for i, key in enumerate(keys):
            (folder / f"{key}.jpg").write_bytes(jpeg((90 + 10 * i, 70)))
        write_texts(root, keys)
        write_split(root, split, keys)
    return splits


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def corrupt_shard(path: Path, n_good: int = 4) -> Path:
    """A truncated JPEG and a garbage member first, then `n_good` good samples."""
    with tarfile.open(path, "w") as tar:
        add_member(tar, "truncated.jpg", jpeg((64, 64))[:300])
        add_member(tar, "truncated.txt", b"half a picture")
        add_member(tar, "garbage.bin", bytes(range(256)) * 4)
        for i in range(n_good):
            add_member(tar, f"good{i}.jpg", jpeg((48, 40), (5, 5, 20, 20)))
            add_member(tar, f"good{i}.txt", f"good picture {i}".encode())
    return path


def tensorboard_events(path: Path) -> list:
    """Every event of a TensorBoard event file (TFRecord framing: length, crc, data, crc), in order."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        events.append(Event.FromString(data[offset + 12 : offset + 12 + length]))
        offset += 12 + length + 4
    return events
