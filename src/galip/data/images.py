"""Image files as a photo folder holds them -> 8-bit RGB, the one form the pipelines train on.

Pillow's own ``convert("RGB")`` is right for RGB, L, CMYK, YCbCr and 1-bit images and wrong for two kinds a
photo folder also holds: 16-bit (``I;16``, ``I``) images, whose values it clips at 255 (a white picture), and
images with transparency, whose hidden colour it shows (often black, so a black logo on a transparent
background vanishes). `to_rgb` scales the first and lays the second on white, as a web page shows it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# What a file that does not decode raises: OSError (unknown format, truncated data; UnidentifiedImageError is
# one), SyntaxError (some broken PNG/GIF headers), ValueError and DecompressionBombError (too many pixels).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16-bit scaled to 8, transparency laid on white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ALPHA_MODES:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (``I;16*``) and 32-bit (``I``, ``F``) grey -> ``L``; 16-bit ranges are divided by 257."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or array.max(initial=0) > 255:
        array = array / 257
    return Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8), "L")


def decode_image(data: bytes, draft_side: int = 0) -> Image.Image:
    """Encoded bytes -> a fully decoded image (a truncated file raises here, not later).

    draft_side: lets a JPEG whose shorter side is above this decode at 1/2, 1/4 or 1/8 scale while staying
    above it (0: full size); a 50-megapixel photo bound for a 1024-pixel shard then never exists at full size.
    """
    image = Image.open(io.BytesIO(data))
    if draft_side and image.format == "JPEG":
        image.draft(
            image.mode, (draft_side + 1, draft_side + 1)
        )  # still above: it is then known to be larger
    image.load()
    return image


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: EXIF orientation applied (and removed from its metadata)."""
    return ImageOps.exif_transpose(image)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1: as stored; 2-8: a viewer flips or rotates it)."""
    return int(image.getexif().get(0x0112, 1) or 1)


def shorter_side_at_most(image: Image.Image, side: int) -> Image.Image:
    """Scaled down (bicubic) so the shorter side is `side`; smaller images, or side 0, are left as they are."""
    if not side or min(image.size) <= side:
        return image
    scale = side / min(image.size)
    size = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
