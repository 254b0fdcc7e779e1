"""The paper's per-sample processing (docs/official_code.md#per-sample-processing), shared by the folder layout and the shard reader.

Image: (CUB: bounding-box crop) -> shorter side to ``size * 76 / 64`` (bilinear) -> random ``size`` crop ->
horizontal flip with p = 0.5 -> [-1, 1]. Evaluation takes the centre crop without a flip (the official code
uses the random training transform for the test split too; a fixed view makes FID and sample grids
repeatable). Captions: a text holds several, one per line; training draws one uniformly per item.

Randomness comes from Python's `random`, which PyTorch reseeds in every DataLoader worker (and
``seed_everything(workers=True)`` makes a function of the run's seed, rank and worker).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from PIL import Image

from galip.data.batch import pil_to_tensor
from galip.data.images import to_rgb

# Official ``Resize(int(imsize * 76 / 64))``: 304 for 256 px crops.
ENLARGE = 76 / 64


def bbox_crop(image: Image.Image, bbox: Sequence[float]) -> Image.Image:
    """CUB: a square of half-side 0.75 * max(w, h) around the box centre, clipped to the image."""
    x, y, w, h = bbox
    r = int(0.75 * max(w, h))
    cx, cy = int((2 * x + w) / 2), int((2 * y + h) / 2)
    left, top = max(0, cx - r), max(0, cy - r)
    right, bottom = min(image.width, cx + r), min(image.height, cy + r)
    return image.crop((left, top, right, bottom))


def resize_shorter(image: Image.Image, side: int) -> Image.Image:
    scale = side / min(image.size)
    size = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def crop_and_flip(image: Image.Image, size: int, train: bool) -> Image.Image:
    """A random (train) or centred (eval) ``size`` square, flipped with p = 0.5 when training."""
    free_x, free_y = image.width - size, image.height - size
    left, top = (
        (random.randint(0, free_x), random.randint(0, free_y)) if train else (free_x // 2, free_y // 2)
    )
    image = image.crop((left, top, left + size, top + size))
    if train and random.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def paper_transform(image: Image.Image, size: int, train: bool, bbox: Sequence[float] | None = None):
    """PIL image -> float (3, size, size) in [-1, 1], as the official data pipeline does it."""
    image = to_rgb(image)
    if bbox is not None:
        image = bbox_crop(image, bbox)
    image = resize_shorter(image, int(size * ENLARGE))
    return pil_to_tensor(crop_and_flip(image, size, train))


def split_captions(text: str) -> list[str]:
    """One caption per non-empty line (CUB: 10 per image, COCO: ~5)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def choose_caption(n_captions: int, train: bool, index: int = 0) -> int:
    """Training draws a caption per item; evaluation fixes one per image (a function of its index)."""
    if train:
        return random.randrange(n_captions)
    return random.Random(index).randrange(n_captions)
