"""The evaluation protocol: which captions condition which images, how many, and what the metrics see.

One protocol for the ``galip.evaluate`` command and the periodic evaluation callback (docs/evaluation.md), and
one interface for what they run: an *evaluator* is a callable ``(Subject) -> {name: value}``. `FIDEvaluator`
(FID and CLIPSIM on a data split) is the framework's; the embedded world brings its judge as another.

The protocol of `FIDEvaluator`:

* captions come from a data split's loader (``{image, caption, tokens}`` batches), in loader order; the loader
  is read again from the start until ``n`` images are generated (the official code's repeated passes:
  CUB 12 × 2,928 ≈ 35k, COCO 1 × ~40k);
* one image per caption, noise ~ N(0, I) from one seeded generator, G in eval mode (EMA weights when there
  are some), output clamped to [-1, 1] (NaN -> -1) and, for FID, quantised to 8 bits like a saved PNG;
* real images: the same split's images, each once (the first pass), at the loader's resolution and crop —
  unless the FID metric was seeded with reference statistics (`FrechetDistance.set_real_statistics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from galip.clip import FrozenCLIP
from galip.metrics.clipsim import CLIPSimilarity
from galip.metrics.fid import EXTRACTORS, FrechetDistance, make_fid, resolve_weights
from galip.metrics.reference import load_reference, seed_fid

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


# ---------------------------------------------------------------------------------------------
# Evaluators
# ---------------------------------------------------------------------------------------------
@dataclass
class Subject:
    """What an evaluator scores: a generator as a function, and what it runs with.

    ``generate``: (captions, noise [B, nz]) -> images in [-1, 1] (G in eval mode, EMA weights when there are
    some); ``clip``: the generator's own frozen CLIP; ``data``: a datamodule whose val/test loaders give the
    captions and real images of a split (None where an evaluator brings its own).
    """

    generate: GenerateFn
    nz: int
    device: torch.device
    clip: FrozenCLIP | None = None
    data: Any = None


class Evaluator(Protocol):
    def __call__(self, subject: Subject) -> dict[str, float]: ...


def run_evaluators(evaluators: Mapping[str, Evaluator] | Sequence[Evaluator] | Evaluator, subject: Subject):
    """The union of several evaluators' numbers (a dict of them, as Hydra builds it, a list, or one)."""
    if callable(evaluators):
        evaluators = [evaluators]
    elif isinstance(evaluators, Mapping):
        evaluators = [e for e in evaluators.values() if e is not None]
    out: dict[str, float] = {}
    for evaluator in evaluators:
        out.update(evaluator(subject))
    return out


class FIDEvaluator:
    """FID and/or CLIPSIM of ``n_samples`` images for a data split's captions, by the protocol above.

    The real statistics are computed once (first call) or come from ``reference`` (a .npz). Missing Inception
    weights fail when the evaluator is built, not hours into training.

    Args:
        n_samples: generated images per evaluation (FID is biased upwards at small N: compare runs at the same N).
        fid: False skips FID (CLIPSIM only).
        extractor, inception_weights, download, reference, reference_extractor, antialias: the FID network and
            its real side (docs/evaluation.md; `galip.metrics.fid.make_fid`, `galip.metrics.reference`).
        features: the feature network of an ``extractor`` that is not a named Inception (e.g. the embedded
            world's judge); ignored for the named ones.
        clipsim: ``"model"`` scores with the generator's own CLIP, ``None`` skips CLIPSIM, or a `FrozenCLIP`.
        split: ``val`` or ``test`` (the subject's datamodule gives its loader).
    """

    def __init__(
        self,
        n_samples: int = 2048,
        batch_size: int = 64,
        fid: bool = True,
        extractor: str = "inception",
        inception_weights: str | None = None,
        download: bool = False,
        reference: str | None = None,
        reference_extractor: str | None = None,
        antialias: bool = False,
        features: torch.nn.Module | None = None,
        clipsim: str | FrozenCLIP | None = "model",
        split: str = "val",
        seed: int = 0,
    ):
        if split not in ("val", "test"):
            raise ValueError(f"split={split!r}: expected 'val' or 'test'")
        self.n_samples, self.batch_size, self.split, self.seed = n_samples, batch_size, split, seed
        self.extractor, self.antialias, self.with_fid = extractor, antialias, fid
        named = extractor in EXTRACTORS
        self.features = None if named else features
        self.weights = resolve_weights(extractor, inception_weights, download) if fid and named else None
        self.reference = load_reference(reference, reference_extractor) if fid and reference else None
        self.clipsim_choice = clipsim
        self._fid: FrechetDistance | None = None
        self._clipsim: CLIPSimilarity | None = None

    def fid(self, device: torch.device) -> FrechetDistance | None:
        if not self.with_fid:
            return None
        if self._fid is None:
            self._fid = make_fid(
                self.extractor, self.weights, antialias=self.antialias, features=self.features
            )
            if self.reference is not None:
                seed_fid(self._fid, self.reference)
        return self._fid.to(device)

    def clipsim(self, subject: Subject) -> CLIPSimilarity | None:
        if self._clipsim is None and self.clipsim_choice is not None:
            clip = subject.clip if self.clipsim_choice == "model" else self.clipsim_choice
            self._clipsim = CLIPSimilarity(clip)
        return None if self._clipsim is None else self._clipsim.to(subject.device)

    def loader(self, data: Any):
        if data is None:
            raise ValueError("FID/CLIPSIM need a datamodule for the captions (and real images) of a split")
        return data.val_dataloader() if self.split == "val" else data.test_dataloader()

    def __call__(self, subject: Subject) -> dict[str, float]:
        return score_generator(
            subject.generate,
            self.loader(subject.data),
            self.n_samples,
            subject.nz,
            self.fid(subject.device),
            self.clipsim(subject),
            self.seed,
        )
