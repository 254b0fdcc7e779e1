"""What the discriminator reads: frozen CLIP taps (GALIP) or pixels (the DF-GAN-style baseline).

The training step asks its D input for two things and is otherwise the same for every Table 3 row:

* ``real(image)``: D's input for real images, without a graph (MAGP differentiates w.r.t. this tensor and
  the sentence vector, so nothing needs to flow back through CLIP for real images);
* ``fake(image)``: D's input for G's images, with a graph, and the CLIP image embedding of the G loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from galip.clip import FrozenCLIP


class CLIPTaps:
    """GALIP's D input: patch tokens of the chosen frozen CLIP-ViT blocks, [B, n_taps, width, grid, grid]."""

    def __init__(self, clip: FrozenCLIP, tap_blocks: Sequence[int]):
        self._clip, self.tap_blocks = (clip,), tuple(tap_blocks)  # a tuple: never a registered submodule

    def real(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            taps, _ = self._clip[0].image_taps(image, self.tap_blocks, with_embedding=False)
        return taps

    def fake(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One CLIP pass gives both the taps and the embedding."""
        taps, embedding = self._clip[0].image_taps(image, self.tap_blocks, with_embedding=True)
        return taps, embedding


class Pixels:
    """The baseline's D input: the image itself, at G's output size (CLIP's input size)."""

    def __init__(self, clip: FrozenCLIP):
        self._clip = (clip,)

    def real(self, image: torch.Tensor) -> torch.Tensor:
        size = self._clip[0].geometry.image_size
        if image.shape[-2:] == (size, size):
            return image.detach()
        return F.interpolate(image.detach(), size=(size, size), mode="bilinear", antialias=True)

    def fake(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The G loss still needs CLIP's image embedding."""
        return image, self._embedding(image)

    def _embedding(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding; the last block's tap is a by-product, dropped."""
        clip = self._clip[0]
        _, embedding = clip.image_taps(image, (clip.geometry.depth - 1,), with_embedding=True)
        return embedding


D_INPUTS = ("clip", "pixels")


def d_input(kind: str, clip: FrozenCLIP, tap_blocks: Sequence[int]) -> CLIPTaps | Pixels:
    """``model.d_input``: ``clip`` (GALIP, the default) or ``pixels`` (the DF-GAN-style baseline)."""
    if kind == "clip":
        return CLIPTaps(clip, tap_blocks)
    if kind == "pixels":
        return Pixels(clip)
    raise ValueError(f"model.d_input={kind!r}: expected one of {D_INPUTS}")


def discriminator_shape(kind: str, clip: FrozenCLIP, n_taps: int) -> dict[str, int]:
    """What D is built around: the stacked CLIP taps, or (``pixels``, the baseline) the images."""
    geo = clip.geometry
    if kind == "pixels":
        return {"image_size": geo.image_size, "embed_dim": geo.embed_dim}
    return {"width": geo.width, "grid": geo.grid, "embed_dim": geo.embed_dim, "n_taps": n_taps}
