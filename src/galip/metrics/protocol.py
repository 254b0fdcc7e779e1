"""The evaluation protocol: which captions condition which images, how many, and what the metrics see.

One protocol for the ``galip.evaluate`` command and the periodic evaluation callback (docs/evaluation.md):

* captions come from a data split's loader (``{image, caption, tokens}`` batches), in loader order; the loader
  is read again from the start until ``n`` images are generated (the official code's repeated passes:
  CUB 12 × 2,928 ≈ 35k, COCO 1 × ~40k);
* one image per caption, noise ~ N(0, I) from one seeded generator, G in eval mode (EMA weights when there
  are some), output clamped to [-1, 1] (NaN -> -1) and, for FID, quantised to 8 bits like a saved PNG;
* real images: the same split's images, each once (the first pass), at the loader's resolution and crop —
  unless the FID metric was seeded with reference statistics (`FrechetDistance.set_real_statistics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from galip.metrics.clipsim import CLIPSimilarity
from galip.metrics.fid import FrechetDistance

GenerateFn = Callable[[Sequence[str], torch.Tensor], torch.Tensor]  # (captions, noise [B, nz]) -> [-1, 1]


def caption_batches(loader: Iterable[dict[str, Any]], n: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(pass index, batch) over ``loader`` repeatedly until ``n`` rows were yielded; the last batch is cut."""
    left, epoch = n, 0
    while left > 0:
        rows = 0
        for batch in loader:
            take = min(left, len(batch["caption"]))
            yield epoch, _head(batch, take)
            left, rows = left - take, rows + take
            if left == 0:
                return
        if rows == 0:
            raise ValueError("the evaluation split's loader is empty")
        epoch += 1


def _head(batch: Any, k: int) -> Any:
    """The first ``k`` rows of a batch (nested dicts such as the shapes world's ``labels`` too)."""
    if isinstance(batch, dict):
        return {key: _head(value, k) for key, value in batch.items()}
    return batch[:k]


@torch.no_grad()
def score_generator(
    generate_fn: GenerateFn,
    loader: Iterable[dict[str, Any]],
    n: int,
    nz: int,
    fid: FrechetDistance | None = None,
    clipsim: CLIPSimilarity | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """FID and/or CLIPSIM of ``n`` images generated for the loader's captions (see the module docstring).

    Returns ``fid``, ``fid/n`` (generated), ``fid/n_real`` and ``clipsim``, ``clipsim/n`` for the metrics given.
    The FID metric's fake side is reset first; its real side is filled only if it is still empty.
    """
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 samples, got n={n}")
    noise_gen = torch.Generator().manual_seed(seed)
    add_real = fid is not None and fid.n_real == 0
    if fid is not None:
        fid.reset()  # keeps the real statistics (reset_real_features=False)
    if clipsim is not None:
        clipsim.reset()
    for epoch, batch in caption_batches(loader, n):
        captions = list(batch["caption"])
        fake = generate_fn(captions, torch.randn(len(captions), nz, generator=noise_gen))
        if fid is not None:
            fid.update(fake.to(fid.device), real=False)
            if add_real and epoch == 0:
                fid.update(batch["image"].to(fid.device), real=True)
        if clipsim is not None:
            clipsim.update(fake, captions)
    return _results(fid, clipsim)


def _results(fid: FrechetDistance | None, clipsim: CLIPSimilarity | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if fid is not None:
        n_real = fid.reference_n
        out.update(
            {
                "fid": float(fid.compute()),
                "fid/n": float(fid.n_fake),
                "fid/n_real": float("nan") if n_real is None else float(n_real),
            }
        )
    if clipsim is not None:
        out.update({"clipsim": float(clipsim.compute()), "clipsim/n": float(clipsim.n)})
    return out
