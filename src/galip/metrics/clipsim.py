"""CLIPSIM as the paper reports it: the mean cosine between CLIP's embedding of a generated image and CLIP's
embedding of the caption that conditioned it (docs/official_code.md#evaluation: ViT-B/32, raw cosine, no ×2.5 and no max(·, 0);
printed ×100 by the official test script).

Caveat worth stating next to every number: GALIP's generator loss maximises this very cosine under the same
ViT-B/32 (λ·cos(E_img(fake), s)), so CLIPSIM is partly optimised directly and says less than it seems.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from galip.clip import FrozenCLIP


class CLIPSimilarity(Metric):
    """``update(images in [-1, 1], captions)``; ``compute()`` -> mean cosine over all images seen.

    Images are clamped to [-1, 1] and go through the CLIP's own pre-processing (``FrozenCLIP.preprocess``:
    resize to its input size, CLIP mean/std). Captions are tokenised by this CLIP's tokenizer, so the scoring
    CLIP need not be the generator's.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, clip: FrozenCLIP, **kwargs: Any):
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(**kwargs)
        self.clip = clip
        self.add_state("cosine_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def cosines(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Per-image cosine [B] between image and caption embeddings."""
        device = self.clip.mean.device
        pixels = self.clip.preprocess(images.to(device).float().clamp(-1, 1))
        image_emb = F.normalize(self.clip.model.encode_image(pixels).float(), dim=-1)
        text_emb = F.normalize(self.clip.encode_text(self.clip.tokenize(list(captions))), dim=-1)
        return (image_emb * text_emb).sum(-1)

    def update(self, images: torch.Tensor, captions: Sequence[str]) -> None:  # type: ignore[override]
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        cos = self.cosines(images, captions)
        self.cosine_sum += cos.double().sum().to(self.cosine_sum.device)
        self.n += len(cos)

    def compute(self) -> torch.Tensor:
        if self.n == 0:
            raise RuntimeError("CLIPSIM of no images")
        return (self.cosine_sum / self.n).float()
