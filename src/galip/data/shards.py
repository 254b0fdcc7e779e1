"""WebDataset shards in the img2dataset layout: ``{key}.jpg|png``, ``{key}.txt``, optional ``{key}.json``.

Used for real data (CC3M/CC12M, converted CUB/COCO) and for the shapes world. Writing is plain
``TarWriter`` with fixed mtime so shards are byte-reproducible; reading is a ``wds.WebDataset`` pipeline
yielding per-sample dicts that `galip.data.batch.collate` turns into batches.

webdataset 1.0.2 traps handled here:
- ``resampled=True`` must come with ``shardshuffle=False`` (a number is ignored with a warning);
- a finite (non-resampled) stream with more loader workers (x ranks) than shards leaves a worker empty and
  ``check_empty`` raises, so `check_worker_count` fails early with a clear message instead.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from galip.data.batch import Tokenizer, collate, pil_to_tensor, tensor_to_pil, tokenize_one

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------------------
# Skipping corrupt samples
# ---------------------------------------------------------------------------------------------------------
class SkipCounter:
    """A webdataset error handler that skips the failing sample and counts it (by exception type).

    Each DataLoader worker holds its own copy, so with ``num_workers > 0`` the counts seen in the main
    process stay at zero; read them inside the worker or use ``num_workers=0`` when auditing a dataset.
    """

    def __init__(self, max_warnings: int = 5):
        self.max_warnings = max_warnings
        self.by_type: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.by_type.values())

    def __call__(self, exn: BaseException) -> bool:
        self.by_type[type(exn).__name__] += 1
        if self.count <= self.max_warnings:  # a corrupt web crawl would otherwise flood the log
            log.warning("skipping corrupt sample (%d so far): %r", self.count, exn)
        return True  # True tells webdataset to continue with the next sample

    def reset(self) -> None:
        self.by_type.clear()


skipped = SkipCounter()  # the default handler; `skipped.count` is what training logs


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def encode_image(image: Image.Image | torch.Tensor | bytes, image_format: str) -> bytes:
    """PIL image, [-1, 1] tensor or already-encoded bytes -> encoded bytes."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, torch.Tensor):
        image = tensor_to_pil(image)
    buffer = io.BytesIO()
    options = {"quality": 95} if image_format == "jpg" else {}
    image.convert("RGB").save(buffer, format="JPEG" if image_format == "jpg" else "PNG", **options)
    return buffer.getvalue()


def encode_sample(sample: dict[str, Any], image_format: str) -> dict[str, Any]:
    """{key, image, caption[, json]} -> the tar members of one sample."""
    record = {
        "__key__": sample["key"],
        image_format: encode_image(sample["image"], image_format),
        "txt": sample["caption"].encode("utf-8"),
    }
    if sample.get("json") is not None:
        record["json"] = json.dumps(sample["json"], sort_keys=True).encode("utf-8")
    return record


def _update_manifest(out_dir: Path, prefix: str, paths: list[Path], counts: list[int], **info: Any) -> None:
    """Merge this prefix's shard list into ``manifest.json`` (several splits may share a directory)."""
    path = out_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {"splits": {}}
    manifest.update(info)
    shards = [{"name": p.name, "count": c} for p, c in zip(paths, counts, strict=True)]
    manifest["splits"][prefix] = {"count": sum(counts), "shards": shards}
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    prefix: str = "train",
    max_per_shard: int = 1000,
    image_format: str = "jpg",
    source: str = "unknown",
) -> list[Path]:
    """Write samples {key, image, caption[, json]} to ``out_dir/{prefix}-NNNNNN.tar``.

    Existing shards with the same prefix are removed first, so a rewrite never leaves stale shards behind.
    Returns the shard paths and records counts and `source` in ``out_dir/manifest.json``.
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{prefix}-*.tar"):
        stale.unlink()
    paths: list[Path] = []
    counts: list[int] = []
    writer = None
    for index, sample in enumerate(samples):
        if index % max_per_shard == 0:
            if writer is not None:
                writer.close()
            paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
            counts.append(0)
            writer = wds.TarWriter(str(paths[-1]), encoder=False, mtime=0)
        writer.write(encode_sample(sample, image_format))
        counts[-1] += 1
    if writer is not None:
        writer.close()
    _update_manifest(out_dir, prefix, paths, counts, source=source, image_format=image_format)
    return paths


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
def list_shards(directory: str | Path, prefix: str) -> list[str]:
    """Sorted shard paths ``directory/{prefix}-*.tar``."""
    return sorted(str(p) for p in Path(directory).glob(f"{prefix}-*.tar"))


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then a centred square crop; a no-op for images already `size` square."""
    if image.size == (size, size):
        return image
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _image_bytes(raw: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in raw:
            return raw[ext]
    raise KeyError(f"sample {raw.get('__key__')!r} has no image member")


def decode_sample(raw: dict[str, Any], tokenizer: Tokenizer, image_size: int) -> dict[str, Any]:
    """Raw tar members -> {image, caption, tokens, key[, labels]}. Raises on corrupt data (the handler skips)."""
    image = Image.open(io.BytesIO(_image_bytes(raw))).convert("RGB")
    caption = raw["txt"].decode("utf-8").strip()
    sample = {
        "image": pil_to_tensor(resize_center_crop(image, image_size)),
        "caption": caption,
        "tokens": tokenize_one(tokenizer, caption),
        "key": raw["__key__"],
    }
    meta = json.loads(raw["json"]) if "json" in raw else {}
    if "labels" in meta:  # structured labels (shapes world); img2dataset metadata has none
        sample["labels"] = {k: torch.tensor(v, dtype=torch.long) for k, v in meta["labels"].items()}
    return sample


def shard_dataset(
    urls: str | list[str],
    tokenizer: Tokenizer,
    image_size: int,
    resampled: bool = False,
    shuffle_buffer: int = 0,
    epoch_length: int | None = None,
    seed: int = 0,
    handler: SkipCounter = skipped,
) -> wds.WebDataset:
    """A streaming pipeline of per-sample dicts compatible with `collate`.

    resampled: draw shards with replacement forever (training; every rank sees an endless stream, so cut
        it with `epoch_length` samples per worker to give every rank the same number of batches).
    shuffle_buffer: samples held for shuffling; 0 keeps file order (evaluation).
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    shardshuffle = False if resampled or not shuffle_buffer else len(urls)
    dataset = wds.WebDataset(
        urls,
        handler=handler,
        resampled=resampled,
        shardshuffle=shardshuffle,
        detshuffle=True,  # shard order a function of (seed, epoch), so runs are reproducible
        nodesplitter=wds.split_by_node,
        seed=seed,
    )
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer)
    dataset = dataset.map(partial(decode_sample, tokenizer=tokenizer, image_size=image_size), handler=handler)
    if epoch_length is not None:
        dataset = dataset.with_epoch(epoch_length)
    return dataset


def check_worker_count(n_shards: int, num_workers: int, world_size: int = 1) -> None:
    """A finite stream needs at least one shard per (rank, worker); webdataset's own error is cryptic."""
    if n_shards < world_size * max(1, num_workers):
        raise ValueError(
            f"{n_shards} shards cannot feed {world_size} rank(s) x {max(1, num_workers)} worker(s): "
            "write more (smaller) shards, lower num_workers, or use resampled=True"
        )


def shard_loader(dataset: wds.WebDataset, batch_size: int, num_workers: int, drop_last: bool) -> DataLoader:
    """DataLoader over a shard pipeline; batching happens per worker, as for any IterableDataset."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
