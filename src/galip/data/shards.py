"""WebDataset shards in the img2dataset layout: ``{key}.jpg|png``, ``{key}.txt``, optional ``{key}.json``.

Used for real data (CC3M/CC12M, converted CUB/COCO) and for the shapes world. Writing is plain
``TarWriter`` with fixed mtime so shards are byte-reproducible; reading is a ``wds.WebDataset`` pipeline
yielding per-sample dicts that `galip.data.batch.collate` turns into batches.

A sample's ``.txt`` may hold several captions, one per line (converted CUB/COCO); one is drawn per item.
Optional members: ``{key}.json`` with ``bbox`` [x, y, w, h] (CUB crop, applied at read time) or ``labels``
(shapes world), and ``{key}.sent-<fingerprint>.npy``, cached sentence vectors (`galip.data.sentences`).

webdataset 1.0.2 traps handled here:
- ``resampled=True`` must come with ``shardshuffle=False`` (a number is ignored with a warning);
- a finite (non-resampled) stream with more loader workers (x ranks) than shards leaves a worker empty and
  ``check_empty`` raises, so `check_worker_count` fails early with a clear message instead.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from galip.data.batch import Loader, Tokenizer, collate, pil_to_tensor, tensor_to_pil, tokenize_one
from galip.data.images import to_rgb
from galip.data.sentences import encode_captions, sent_member, text_fingerprint
from galip.data.transforms import bbox_crop, choose_caption, paper_transform, split_captions

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"
# How a sample's image becomes a tensor: a plain centred square (shapes world, legacy), or the paper's
# resize + random crop + flip for training and its centred variant for evaluation (`galip.data.transforms`).
TRANSFORMS = ("center", "paper-train", "paper-eval")
# A shard's name inside webdataset's error messages ("... @ <_io.BufferedReader name='/d/00001.tar'>", urls).
SHARD_NAME = re.compile(r"[^\s'\"<>=]+\.tar\b")


# ---------------------------------------------------------------------------------------------------------
# Skipping corrupt samples
# ---------------------------------------------------------------------------------------------------------
class CorruptSample(ValueError):
    """A sample whose members are there but do not decode (truncated JPEG, garbage, missing caption)."""


def shard_name(exn: BaseException) -> str | None:
    """The shard a reading error names: webdataset appends the url to ``args``; open() sets ``filename``."""
    texts = [a for a in reversed(exn.args) if isinstance(a, str)] + [str(getattr(exn, "filename", "") or "")]
    names = (SHARD_NAME.search(t) for t in texts)
    return next((m.group(0) for m in names if m), None)


class SkipCounter:
    """A webdataset error handler that skips the failing sample (or shard) and counts it by exception type.

    Errors from `decode_sample` are single samples (`CorruptSample`); anything else comes from opening or
    reading a tar and loses the rest of that shard, which is reported by name, once per shard, always.

    Each DataLoader worker holds its own copy, so with ``num_workers > 0`` the counts seen in the main
    process stay at zero: `count_skips` carries each worker's count on the samples instead (the batch's
    ``skipped``), which is what training logs as ``data/skipped``.
    """

    def __init__(self, max_warnings: int = 5):
        self.max_warnings = max_warnings
        self.by_type: Counter[str] = Counter()
        self.bad_shards: set[str] = set()

    @property
    def count(self) -> int:
        return sum(self.by_type.values())

    def __call__(self, exn: BaseException) -> bool:
        self.by_type[type(exn).__name__] += 1
        shard = None if isinstance(exn, CorruptSample) else shard_name(exn)
        if shard is not None:
            self._report_shard(shard, exn)
        elif self.count <= self.max_warnings:  # a corrupt web crawl would otherwise flood the log
            log.warning("skipping corrupt sample (%d so far): %s", self.count, exn)
        return True  # True tells webdataset to continue with the next sample

    def _report_shard(self, shard: str, exn: BaseException) -> None:
        if shard not in self.bad_shards:
            self.bad_shards.add(shard)
            log.warning(
                "unreadable shard %s (rest of it skipped): %s", shard, exn.args[0] if exn.args else exn
            )

    def reset(self) -> None:
        self.by_type.clear()
        self.bad_shards.clear()


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


def _update_manifest(
    out_dir: Path,
    prefix: str,
    paths: list[Path],
    counts: list[int],
    captions: int,
    split_info: dict[str, Any],
    **info: Any,
) -> None:
    """Merge this prefix's shard list into ``manifest.json`` (several splits may share a directory)."""
    path = out_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {"splits": {}}
    manifest.update(info)
    shards = [{"name": p.name, "count": c} for p, c in zip(paths, counts, strict=True)]
    manifest["splits"][prefix] = {"count": sum(counts), "captions": captions, "shards": shards, **split_info}
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _stale_shards(out_dir: Path, prefix: str, name_format: str | None) -> list[Path]:
    if name_format is None:
        return list(out_dir.glob(f"{prefix}-*.tar"))
    manifest = out_dir / MANIFEST
    listed = json.loads(manifest.read_text())["splits"].get(prefix, {}) if manifest.exists() else {}
    return [out_dir / s["name"] for s in listed.get("shards", []) if (out_dir / s["name"]).exists()]


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    prefix: str = "train",
    max_per_shard: int = 1000,
    image_format: str = "jpg",
    source: str = "unknown",
    name_format: str | None = None,
    skipped: Mapping[str, int] | None = None,
) -> list[Path]:
    """Write samples {key, image, caption[, json]} to ``out_dir/{prefix}-NNNNNN.tar``.

    name_format: another shard naming, e.g. img2dataset's ``"{index:05d}.tar"`` (gets ``prefix``, ``index``).
    skipped: pairs the source left out, by reason; read once `samples` is exhausted, so a source may count
        them while it is consumed (`galip.data.make_shards`).
    Existing shards of this prefix (``{prefix}-*.tar``, or those the manifest lists) are removed first, so a
    rewrite never leaves stale shards behind, and an error while writing removes this call's shards, so an
    interrupted one leaves none half-written. Returns the shard paths and records counts, caption counts
    (lines of the ``.txt``), `skipped` and `source` in ``out_dir/manifest.json``.
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in _stale_shards(out_dir, prefix, name_format):
        stale.unlink()
    paths: list[Path] = []
    counts: list[int] = []
    n_captions = 0
    writer = None
    try:
        for index, sample in enumerate(samples):
            if index % max_per_shard == 0:
                if writer is not None:
                    writer.close()
                name = (name_format or "{prefix}-{index:06d}.tar").format(prefix=prefix, index=len(paths))
                paths.append(out_dir / name)
                counts.append(0)
                writer = wds.TarWriter(str(paths[-1]), encoder=False, mtime=0)
            writer.write(encode_sample(sample, image_format))
            counts[-1] += 1
            n_captions += len(split_captions(sample["caption"]))
    except BaseException:
        if writer is not None:
            writer.close()
        for path in paths:
            path.unlink(missing_ok=True)
        raise
    if writer is not None:
        writer.close()
    split_info = {"skipped": dict(sorted(skipped.items()))} if skipped is not None else {}
    _update_manifest(
        out_dir, prefix, paths, counts, n_captions, split_info, source=source, image_format=image_format
    )
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


def _to_tensor(image: Image.Image, image_size: int, transform: str, bbox: list[float] | None) -> torch.Tensor:
    if transform == "center":
        image = to_rgb(image) if bbox is None else bbox_crop(to_rgb(image), bbox)
        return pil_to_tensor(resize_center_crop(image, image_size))
    return paper_transform(image, image_size, train=transform == "paper-train", bbox=bbox)


def decode_sample(
    raw: dict[str, Any],
    tokenizer: Tokenizer,
    image_size: int,
    transform: str = "center",
    sent_ext: str | None = None,
) -> dict[str, Any]:
    """Raw tar members -> {image, caption, tokens, key[, sent_emb, labels]}. Raises on corrupt data.

    sent_ext: the member holding this CLIP's cached sentence vectors (`galip.data.sentences.sent_member`);
        used when the sample has it, one row per caption line.
    """
    image = Image.open(io.BytesIO(_image_bytes(raw)))
    image.load()  # decode now: a truncated file must fail here, inside the handler's reach
    captions = split_captions(raw["txt"].decode("utf-8"))
    if not captions:
        raise ValueError("empty caption")
    # Evaluation fixes the caption per key, so repeated passes condition on the same text.
    index = choose_caption(len(captions), transform == "paper-train", zlib.crc32(raw["__key__"].encode()))
    meta = json.loads(raw["json"]) if "json" in raw else {}
    sample = {
        "image": _to_tensor(image, image_size, transform, meta.get("bbox")),
        "caption": captions[index],
        "tokens": tokenize_one(tokenizer, captions[index]),
        "key": raw["__key__"],
    }
    if sent_ext is not None and sent_ext in raw:
        vectors = np.load(io.BytesIO(raw[sent_ext]), allow_pickle=False)
        if len(vectors) != len(captions):
            raise ValueError(f"{sent_ext} has {len(vectors)} rows for {len(captions)} captions")
        sample["sent_emb"] = torch.from_numpy(vectors[index].astype(np.float32))
    if "labels" in meta:  # structured labels (shapes world); img2dataset metadata has none
        sample["labels"] = {k: torch.tensor(v, dtype=torch.long) for k, v in meta["labels"].items()}
    return sample


def _decode_or_flag(raw: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """`decode_sample`, with any failure turned into a `CorruptSample` naming the key and its shard."""
    try:
        return decode_sample(raw, **kwargs)
    except Exception as err:
        raise CorruptSample(f"{raw.get('__key__')!r} in {raw.get('__url__')}: {err!r}") from err


def count_skips(samples: Iterator[dict[str, Any]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Pipeline stage: each sample carries ``skipped``, the skips since the previous sample of this worker.

    Summed by `collate`, the batches then carry every worker's skips to the main process.
    """
    seen = counter.count
    for sample in samples:
        sample["skipped"], seen = counter.count - seen, counter.count
        yield sample


def shard_dataset(
    urls: str | list[str],
    tokenizer: Tokenizer,
    image_size: int,
    resampled: bool = False,
    shuffle_buffer: int = 0,
    epoch_length: int | None = None,
    seed: int = 0,
    handler: SkipCounter = skipped,
    transform: str = "center",
    sent_ext: str | None = None,
) -> wds.WebDataset:
    """A streaming pipeline of per-sample dicts compatible with `collate`.

    resampled: draw shards with replacement forever (training; every rank sees an endless stream, so cut
        it with `epoch_length` samples per worker to give every rank the same number of batches).
    shuffle_buffer: samples held for shuffling; 0 keeps file order (evaluation).
    transform: one of `TRANSFORMS`; sent_ext: see `decode_sample`.
    Skipped samples are counted by `handler` and carried on each sample as ``skipped`` (`count_skips`).
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
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
    if resampled:
        # WebDataset(resampled=True) draws shards with a seed from the pid, the clock and os.urandom, and
        # ignores `seed`: two ranks could draw the same shards and no run could be replayed. Draw them from
        # (seed, epoch, rank·1000 + worker) instead: different per rank and worker, the same on every run.
        if not isinstance(dataset.pipeline[0], wds.ResampledShards):  # webdataset's layout has changed
            raise RuntimeError(
                f"expected WebDataset's first stage to be ResampledShards: {dataset.pipeline[0]}"
            )
        dataset.pipeline[0] = wds.ResampledShards(urls, seed=seed, deterministic=True)
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer)
    decode = partial(
        _decode_or_flag, tokenizer=tokenizer, image_size=image_size, transform=transform, sent_ext=sent_ext
    )
    dataset = dataset.map(decode, handler=handler).compose(partial(count_skips, counter=handler))
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
    return Loader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )


# ---------------------------------------------------------------------------------------------------------
# The sentence-vector cache inside shards (python -m galip.data.encode_text)
# ---------------------------------------------------------------------------------------------------------
def add_sentence_vectors(shard: Path, clip, batch_size: int = 256) -> Path:
    """Rewrite `shard` with a ``{key}.sent-<fingerprint>.npy`` member after each sample's own members.

    One float32 row per caption line of ``{key}.txt``. Written to a temporary file and renamed, so an
    interrupted run leaves the original shard intact.
    """
    member = sent_member(text_fingerprint(clip))
    samples = _read_samples(shard)
    captions = [split_captions(s["txt"].decode("utf-8")) if "txt" in s else [] for _, s in samples]
    vectors = encode_captions(clip, [c for per in captions for c in per], batch_size).numpy()
    tmp = shard.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        row = 0
        for (key, members), caps in zip(samples, captions, strict=True):
            members.pop(member, None)  # re-encoding with the same CLIP replaces the old vectors
            if caps:
                members[member] = _npy(vectors[row : row + len(caps)])
                row += len(caps)
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)
    tmp.replace(shard)
    _note_in_manifest(shard.parent, member, vectors.shape[-1])
    return shard


def _read_samples(shard: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Members grouped into samples by key (the part before the first dot of the name), in tar order."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(shard) as tar:
        for info in tar:
            if not info.isreg():
                continue
            directory, _, base = info.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{directory}/{stem}" if directory else stem
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(info).read()
    return samples


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def _note_in_manifest(directory: Path, member: str, dim: int) -> None:
    path = directory / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text())
        manifest.setdefault("sentence_vectors", {})[member] = {"dim": int(dim)}
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
