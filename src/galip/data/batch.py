"""The batch contract shared by every data source, and the collate that builds it.

A batch is a dict::

    image     float32 (B, 3, H, W) in [-1, 1]
    caption   list[str] of length B
    tokens    int64 (B, 77)  CLIP token ids
    sent_emb  float (B, D)   only when a cache provides sentence vectors

Sources may add extra per-sample fields (``key``, ``labels``); they are carried along so that
evaluation code (e.g. the shapes-world judge) can use them, but models only rely on the four above.
Streamed shards and the CUB/COCO folders add ``skipped`` (int): corrupt samples dropped since the previous
batch, logged as ``data/skipped`` by `galip.callbacks.SkippedSamples`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

Tokenizer = Callable[[list[str]], torch.Tensor]
CONTEXT_LENGTH = 77


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """Float (3, H, W) in [-1, 1] -> RGB PIL image (inverse of `pil_to_tensor` up to rounding)."""
    array = image.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).byte()
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def tokenize_one(tokenizer: Tokenizer, caption: str) -> torch.Tensor:
    """Token ids (77,) for one caption; tokenizers work on lists and return (N, 77)."""
    return tokenizer([caption])[0].long()


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-sample dicts {image, caption, tokens[, sent_emb, key, labels]} -> one batch dict."""
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]).float(),
        "caption": [s["caption"] for s in samples],
        "tokens": torch.stack([s["tokens"] for s in samples]).long(),
    }
    if "sent_emb" in samples[0]:
        batch["sent_emb"] = torch.stack([s["sent_emb"] for s in samples]).float()
    if "key" in samples[0]:
        batch["key"] = [s["key"] for s in samples]
    if "skipped" in samples[0]:  # corrupt samples the stream dropped since the last batch (shards)
        batch["skipped"] = sum(s["skipped"] for s in samples)
    if "labels" in samples[0]:
        batch["labels"] = default_collate([s["labels"] for s in samples])
    return batch


def check_batch(batch: dict[str, Any]) -> None:
    """Raise if `batch` breaks the contract; cheap enough to call in tests and at start-up."""
    image, tokens = batch["image"], batch["tokens"]
    n = image.shape[0]
    assert image.ndim == 4 and image.shape[1] == 3 and image.dtype == torch.float32, image.shape
    assert image.min() >= -1.0 and image.max() <= 1.0, "image outside [-1, 1]"
    assert tokens.shape == (n, CONTEXT_LENGTH) and tokens.dtype == torch.long, tokens.shape
    assert len(batch["caption"]) == n and all(isinstance(c, str) for c in batch["caption"])
    if "sent_emb" in batch:
        assert batch["sent_emb"].ndim == 2 and batch["sent_emb"].shape[0] == n


class Tokenized(Dataset):
    """Adds `tokens` to the samples of a map-style dataset that yields {image, caption, ...}.

    Tokenization lives here rather than in the sources so the sources stay independent of CLIP.
    """

    def __init__(self, dataset: Dataset, tokenizer: Tokenizer):
        self.dataset = dataset
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        sample["tokens"] = tokenize_one(self.tokenizer, sample["caption"])
        return sample


class Loader(DataLoader):
    """``DataLoader`` whose worker processes ignore SIGTERM, so a signal sent to the whole job (a cluster's
    preemption, ``kill -TERM -<pgid>``) stops the run at the end of its batch, with a checkpoint
    (`galip.callbacks.Checkpoint`), instead of killing the workers, which makes PyTorch raise in the middle of
    the batch. The workers still end when the loader shuts them down or when the main process is gone.

    The ignoring is added to the loader's ``worker_init_fn`` as the workers start, after Lightning has set its
    own (the per-worker seeding of ``seed_everything(workers=True)``), which then runs as before.
    """

    def _get_iterator(self):
        if self.num_workers > 0 and not isinstance(self.worker_init_fn, IgnoringSigterm):
            self.worker_init_fn = IgnoringSigterm(self.worker_init_fn)
        return super()._get_iterator()


class IgnoringSigterm:
    """A ``worker_init_fn`` (picklable, so spawned workers get it too): ignore SIGTERM, then run ``init``."""

    def __init__(self, init: Callable[[int], None] | None):
        self.init = init

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.init is not None:
            self.init(worker_id)
