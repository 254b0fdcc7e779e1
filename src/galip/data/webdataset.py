"""WebDataset shards at scale: CC3M/CC12M in the img2dataset layout, or CUB/COCO converted by `make_shards`.

``shards`` is a brace pattern (``/data/cc12m/{00000..01242}.tar``), a list of them, a directory of ``*.tar``
or ``pipe:`` commands (``pipe:aws s3 cp s3://bucket/{00000..01242}.tar -``). Training resamples shards
per (rank, worker) with replacement, forever, and cuts each epoch at `epoch_samples` images over all ranks,
in whole batches, so every rank runs the same number of batches (no DDP hang at an epoch's end).
Corrupt samples are skipped and counted (batch ``skipped``, logged as ``data/skipped``); an unreadable
shard is reported by name and the stream goes on.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lightning as L
from braceexpand import braceexpand
from torch.utils.data import DataLoader

from galip.data.batch import Tokenizer
from galip.data.paper_layout import DatasetMissing
from galip.data.resume import ResumableData
from galip.data.sentences import sent_member, training_clip_fingerprint
from galip.data.shards import (
    SkipCounter,
    add_sentence_vectors,
    check_worker_count,
    shard_dataset,
    shard_loader,
)

log = logging.getLogger(__name__)

HOW_TO_GET = (
    "write shards with `python -m galip.data.make_shards` (CUB/COCO/a folder) or img2dataset "
    "(CC3M/CC12M); see docs/data.md"
)


# A brace range or list, as in "/d/{00000..01242}.tar" or "{a,b}.tar" (Hydra reads bare braces as a dict).
BRACES = re.compile(r"\{[^{}:]*(\.\.|,)[^{}:]*\}")


def quote_shard_patterns(argv: list[str]) -> list[str]:
    """Quote ``key=value`` overrides whose value holds a brace pattern, so Hydra takes it as a string.

    ``data.shards='/d/{00000..00009}.tar'`` typed in a shell reaches Python without its quotes.
    """
    quoted = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and BRACES.search(value) and value[:1] not in ("'", '"') and "'" not in value:
            arg = f"{key}='{value}'"
        quoted.append(arg)
    return quoted


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_urls(spec: str | Path | list[str]) -> list[str]:
    """Brace patterns (and lists of them) -> shard URLs; a directory -> its ``*.tar`` files, sorted."""
    specs = [str(s) for s in spec] if isinstance(spec, list | tuple) else [str(spec)]
    urls: list[str] = []
    for item in specs:
        if not is_remote(item) and Path(item).expanduser().is_dir():
            urls += sorted(str(p) for p in Path(item).expanduser().glob("*.tar"))
        else:
            urls += [str(Path(u).expanduser()) if not is_remote(u) else u for u in braceexpand(item)]
    return urls


def check_local_shards(urls: list[str], key: str) -> None:
    """Local shards must exist (remote ones are checked as they stream, and reported by name if broken)."""
    if not urls:
        raise DatasetMissing(f"{key} names no shard: {HOW_TO_GET}")
    absent = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if absent:
        raise DatasetMissing(
            f"{key}: shard not found: {absent[0]} ({len(absent)} of {len(urls)} missing); {HOW_TO_GET}"
        )


class WebDataModule(ResumableData, L.LightningDataModule):
    """Streams ``{key}.jpg|png``, ``{key}.txt`` (one or more captions), optional ``{key}.json`` shards.

    Args:
        shards: training shards (see the module docstring). val_shards: optional evaluation shards, read
            once in order with the centred view (None: no validation data; sample grids use their defaults).
        epoch_samples: images per epoch over all ranks (CC12M: ~10 M downloaded by img2dataset).
        transform: ``paper-train`` (resize + random crop + flip, the paper's) or ``center``.
        sent_cache: use ``{key}.sent-<fingerprint>.npy`` members for the training CLIP when the shards have
            them (`python -m galip.data.encode_text`).
        n_val: cap on evaluation images per rank (None: all of the val shards).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        shards: str | list[str] | None,
        val_shards: str | list[str] | None = None,
        image_size: int = 256,
        batch_size: int = 64,
        num_workers: int = 4,
        epoch_samples: int = 100_000,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        transform: str = "paper-train",
        sent_cache: bool = True,
        n_val: int | None = None,
    ):
        super().__init__()
        if not shards:
            raise DatasetMissing(f"data.shards is not set: point it at the training shards; {HOW_TO_GET}")
        self.tokenizer, self.image_size, self.batch_size = tokenizer, image_size, batch_size
        self.num_workers, self.epoch_samples, self.shuffle_buffer = num_workers, epoch_samples, shuffle_buffer
        self.seed, self.transform, self.sent_cache, self.n_val = seed, transform, sent_cache, n_val
        self.urls = expand_urls(shards)
        check_local_shards(self.urls, "data.shards")
        self.val_urls = expand_urls(val_shards) if val_shards else []
        if val_shards:
            check_local_shards(self.val_urls, "data.val_shards")
        self.sent_ext: str | None = None
        self.skips = SkipCounter()

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def setup(self, stage: str | None = None) -> None:
        fingerprint = training_clip_fingerprint(self.trainer) if self.sent_cache else None
        self.sent_ext = sent_member(fingerprint) if fingerprint else None
        if self.sent_ext:
            log.info("sentence vectors from shard members *.%s where present", self.sent_ext)

    def samples_per_worker(self) -> int:
        """Whole batches per worker, the same on every rank: ceil(batches per rank / workers) batches."""
        workers = max(1, self.num_workers)
        batches_per_rank = max(1, self.epoch_samples // (self.world_size * self.batch_size))
        return -(-batches_per_rank // workers) * self.batch_size

    def train_dataloader(self) -> DataLoader:
        # Resampling would let fewer shards "work", but every worker would then read the same few files.
        check_worker_count(len(self.urls), self.num_workers, self.world_size)
        per_worker = self.samples_per_worker()
        dataset = shard_dataset(
            self.urls,
            self.tokenizer,
            self.image_size,
            resampled=True,
            shuffle_buffer=self.shuffle_buffer,
            epoch_length=per_worker,
            seed=self.stream_seed(self.seed),
            handler=self.skips,
            transform=self.transform,
            sent_ext=self.sent_ext,
        ).with_length(per_worker * max(1, self.num_workers))  # len(loader) = batches per rank
        return shard_loader(dataset, self.batch_size, self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        check_worker_count(len(self.val_urls), 1, self.world_size)
        workers = min(self.num_workers, len(self.val_urls) // self.world_size)
        dataset = shard_dataset(
            self.val_urls,
            self.tokenizer,
            self.image_size,
            resampled=False,
            handler=SkipCounter(),
            transform="center" if self.transform == "center" else "paper-eval",
            sent_ext=self.sent_ext,
        )
        if self.n_val is not None:
            dataset = dataset.slice(-(-self.n_val // max(1, workers)))
        return shard_loader(dataset, self.batch_size, workers, drop_last=False)

    # -- the sentence-vector cache (python -m galip.data.encode_text) -----------------------------

    def encode_sentences(self, clip, batch_size: int = 256) -> list[Path]:
        """Add this CLIP's sentence vectors to every local shard (rewritten in place); returns the shards."""
        urls = self.urls + self.val_urls
        remote = [u for u in urls if is_remote(u)]
        if remote:
            raise ValueError(
                f"encode_text rewrites local shards only, not {remote[0]}: copy the shards locally"
            )
        return [add_sentence_vectors(Path(u), clip, batch_size) for u in urls]
