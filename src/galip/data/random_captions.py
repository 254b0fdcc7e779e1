"""Random images with random captions: the cheapest possible source, for smoke tests.

Every sample is a pure function of (seed, index), so two runs with the same seed see the same data
regardless of worker count or access order.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from galip.data.batch import Tokenizer, tokenize_one
from galip.data.resume import ResumableData

ADJECTIVES = ["red", "blue", "green", "small", "large", "bright", "dark", "striped", "round", "tall"]
NOUNS = ["bird", "cat", "car", "flower", "house", "tree", "boat", "dog", "cup", "mountain"]
PLACES = ["on a table", "in a field", "near the sea", "under the sky", "in a room", "on a road"]
NOISE_RES = 8  # low-res noise, upsampled, so images have some spatial structure (not pure white noise)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng((seed, index))


def random_image(rng: np.random.Generator, image_size: int) -> torch.Tensor:
    """Smooth noise image (3, S, S) in [-1, 1]."""
    low = torch.from_numpy(rng.uniform(-1.0, 1.0, (1, 3, NOISE_RES, NOISE_RES)).astype(np.float32))
    image = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return image[0].clamp(-1.0, 1.0)


def random_caption(rng: np.random.Generator) -> str:
    adjective, noun, place = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(PLACES)
    return f"a {adjective} {noun} {place}"


class RandomCaptionDataset(Dataset):
    """`n` samples {image, caption, tokens}; deterministic in (seed, index)."""

    def __init__(self, n: int, image_size: int, seed: int, tokenizer: Tokenizer | None = None):
        self.n, self.image_size, self.seed = n, image_size, seed
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        rng = _rng(self.seed, index)
        sample = {"image": random_image(rng, self.image_size), "caption": random_caption(rng)}
        if self.tokenizer is not None:
            sample["tokens"] = tokenize_one(self.tokenizer, sample["caption"])
        return sample


class RandomCaptionDataModule(ResumableData, L.LightningDataModule):
    """Train/val loaders over `RandomCaptionDataset`; val uses a different seed stream than train.

    The training order is a function of (seed, epoch) and resumes mid-epoch exactly (`ResumableData`).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_size: int = 64,
        n_train: int = 64,
        n_val: int = 16,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.n_train, self.n_val, self.seed = n_train, n_val, seed

    def setup(self, stage: str | None = None) -> None:
        self.train_set = RandomCaptionDataset(self.n_train, self.image_size, self.seed, self.tokenizer)
        # An offset seed keeps val samples distinct from train samples at the same index.
        self.val_set = RandomCaptionDataset(
            self.n_val, self.image_size, self.seed + 1_000_003, self.tokenizer
        )

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return self.map_loader(dataset, self.seed, train)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
