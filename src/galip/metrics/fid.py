"""FID through torchmetrics' `FrechetInceptionDistance` (the Fréchet maths is the library's, not ours).

Two named feature extractors, both fed the same 8-bit images (see `to_uint8`):

* ``inception`` — torch-fidelity's Inception-v3 with the TF-FID weights (``pt_inception-2015-12-05``), TF1-style
  bilinear resize to 299 px: the standard FID of pytorch-fid / torch-fidelity / most GAN papers.
* ``dfgan_inception`` — torchvision's ImageNet Inception-v3 with the input path of the official GALIP / DF-GAN
  code (docs/official_code.md#evaluation): the only extractor whose numbers are comparable with the DF-GAN family's
  ``*_FIDK0.npz`` reference statistics and with the paper's tables.

Any other network that maps uint8 images [B, 3, H, W] to features [B, F] and has ``num_features`` works too,
under a name of its own: ``make_fid("judge", features=network)`` (the embedded world's judge-FD is built this
way; in configs ``metrics.fid.extractor=<name>`` with ``metrics.fid.features`` a ``_target_`` building it).

Weights are never downloaded silently: a missing file stops at once with one line saying what is missing and
how to get it (``metrics.inception_weights=PATH`` or ``metrics.download=true`` on a machine with internet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


# ---------------------------------------------------------------------------------------------
# Weights: a local file, the library's usual cache, or an explicit download
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsSource:
    filename: str  # the name the library's cache (torch hub checkpoints dir) uses
    url: str
    what: str
    hint: str  # the file name users are most likely to have


WEIGHTS = {
    "inception": WeightsSource(
        "weights-inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "TF-FID Inception-v3",
        "pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or weights-inception-2015-12-05-6726825d.pth",
    ),
    "dfgan_inception": WeightsSource(
        "inception_v3_google-0cc3c7bd.pth",
        "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
        "torchvision ImageNet Inception-v3 (IMAGENET1K_V1)",
        "inception_v3_google-0cc3c7bd.pth",
    ),
}
EXTRACTORS = ("inception", "dfgan_inception")


class InceptionWeightsMissing(FileNotFoundError):
    """Raised before anything is built when the FID network's weights are not on this machine."""


def cached_weights_path(extractor: str) -> Path:
    """Where torch-fidelity / torchvision keep the file after their own download (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS[extractor].filename


def resolve_weights(extractor: str, path: str | os.PathLike | None = None, download: bool = False) -> Path:
    """A local weights file for ``extractor``: ``path`` if given, else the library cache, else (only with
    ``download``) a fresh download into that cache. Anything else is one clear error, never a retry loop."""
    source = WEIGHTS[extractor]
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InceptionWeightsMissing(f"metrics.inception_weights={path}: no such file ({source.what})")
        return path
    cached = cached_weights_path(extractor)
    if cached.is_file():
        return cached
    if download:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(source.url, str(cached))
        return cached
    raise InceptionWeightsMissing(
        f"FID needs the {source.what} weights, not found in {cached.parent}: pass "
        f"metrics.inception_weights=<path to {source.hint}> or run once with metrics.download=true on a "
        f"machine with internet (fetches {source.url})"
    )


# ---------------------------------------------------------------------------------------------
# Extractors that are not torchmetrics' built-in Inception. Inputs: uint8 [B, 3, H, W].
# ---------------------------------------------------------------------------------------------
class DFGANInception(nn.Module):
    """torchvision's ImageNet Inception-v3 cut at the 2048-d pool, with the official code's input path.

    docs/official_code.md#fid: [-1, 1] -> [0, 1] -> bilinear resize to 299 -> torchvision's ``transform_input`` affine applied
    to the [0, 1] data (not to ImageNet-normalised data: a quirk, kept because it defines the DF-GAN statistics).
    """

    num_features = 2048

    def __init__(self, weights: str | os.PathLike | None):
        super().__init__()
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        if weights is not None:
            state = {k: v for k, v in _state_dict(weights).items() if not k.startswith("AuxLogits.")}
            net.load_state_dict(state)
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> DFGANInception:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = _imagenet_affine(x)
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1):
            x = layer(x)
        for layer in (n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a):
            x = layer(x)
        for layer in (n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _imagenet_affine(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``transform_input`` (which ``inception_v3(pretrained=True)`` switches on)."""
    scale = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1) / 0.5
    shift = (torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1) - 0.5) / 0.5
    return x * scale + shift


def _state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise ValueError(f"{path} is not a readable Inception-v3 state dict: {err}") from err


# ---------------------------------------------------------------------------------------------
# The metric
# ---------------------------------------------------------------------------------------------
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, exactly as a saved PNG would hold them (official: clamp, then NaN -> -1)."""
    images = torch.nan_to_num(images.float(), nan=-1.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
    return ((images + 1) * 127.5).round().to(torch.uint8)


class FrechetDistance(FrechetInceptionDistance):
    """torchmetrics FID fed [-1, 1] images, with an extractor name and a way to seed precomputed real statistics.

    Real statistics are kept across ``reset()`` (``reset_real_features=False``): periodic evaluation computes
    them once. ``sync_on_compute=False``: evaluation runs on one process.
    """

    def __init__(self, feature: int | nn.Module = 2048, extractor: str = "custom", **kwargs: Any):
        kwargs.setdefault("reset_real_features", False)
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(feature=feature, normalize=False, **kwargs)
        self.extractor = extractor
        self.seeded_n: int | None = None  # set when the real side came from reference statistics
        self.seeded = False

    def update(self, images: torch.Tensor, real: bool) -> None:  # type: ignore[override]
        imgs = images if images.dtype == torch.uint8 else to_uint8(images)
        super().update(imgs, real=real)

    @property
    def n_real(self) -> int:
        return int(self.real_features_num_samples)

    @property
    def reference_n(self) -> int | None:
        """Real images behind the real statistics (None: seeded from a file that does not say)."""
        return self.seeded_n if self.seeded else self.n_real

    @property
    def n_fake(self) -> int:
        return int(self.fake_features_num_samples)

    def real_statistics(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mu, sigma, n) of the real features seen so far, from the metric's own running sums."""
        n = self.n_real
        if n < 2:
            raise RuntimeError("reference statistics need at least 2 real images")
        mu = self.real_features_sum / n
        sigma = (self.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
        return mu, sigma, n

    def set_real_statistics(self, mu: torch.Tensor, sigma: torch.Tensor, n: int | None = None) -> None:
        """Seed the real side with precomputed (mu, sigma): the running sums are set so that torchmetrics'
        ``compute()`` recovers exactly this mean and covariance (for any n >= 2; DF-GAN files carry no n)."""
        mu, sigma = torch.as_tensor(mu).double(), torch.as_tensor(sigma).double()
        if mu.shape != self.real_features_sum.shape or sigma.shape != self.real_features_cov_sum.shape:
            raise ValueError(
                f"reference statistics have {tuple(mu.shape)} features, extractor {self.extractor} gives "
                f"{tuple(self.real_features_sum.shape)}"
            )
        self.seeded, self.seeded_n = True, (int(n) if n else None)
        n = int(n) if n and n >= 2 else 2
        device = self.real_features_sum.device
        self.real_features_sum = (n * mu).to(device)
        self.real_features_cov_sum = ((n - 1) * sigma + n * torch.outer(mu, mu)).to(device)
        self.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)


def make_fid(
    extractor: str = "inception",
    weights: str | os.PathLike | None = None,
    download: bool = False,
    antialias: bool = False,
    features: nn.Module | None = None,
) -> FrechetDistance:
    """The FID metric of the documented protocol for ``extractor`` (see the module docstring): one of
    `EXTRACTORS`, or any other name for the network ``features``.

    ``antialias=False`` keeps torch-fidelity's TF1-compatible bilinear resize for ``inception`` (the standard
    FID); torchmetrics' own default (antialiased) gives slightly different numbers.
    """
    if extractor == "inception":
        path = resolve_weights(extractor, weights, download)
        try:
            return FrechetDistance(
                2048, extractor, feature_extractor_weights_path=str(path), antialias=antialias
            )
        except (RuntimeError, OSError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path} is not a TF-FID Inception-v3 state dict: {first}") from err
    if extractor == "dfgan_inception":
        return FrechetDistance(DFGANInception(resolve_weights(extractor, weights, download)), extractor)
    if features is not None:
        return FrechetDistance(features, extractor)
    raise ValueError(
        f"metrics.fid.extractor={extractor!r} is none of {EXTRACTORS}: give its feature network as "
        f"metrics.fid.features (a _target_ building a module with num_features)"
    )
