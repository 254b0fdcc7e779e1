"""Convert image + caption folders to WebDataset shards (the img2dataset layout).

::

    python -m galip.data.make_shards cub    --root data/birds --out shards/cub
    python -m galip.data.make_shards coco   --root data/coco  --out shards/coco
    python -m galip.data.make_shards folder --root my_pairs   --out shards/mine   # a.jpg + a.txt, any depth

Each split goes to ``<out>/<split>/{00000,00001,...}.tar`` with a ``manifest.json`` beside it (sample and
caption counts, source). A sample is ``{key}.jpg`` (the original bytes, not re-encoded), ``{key}.txt``
(every caption of the image, one per line; the reader draws one per item) and ``{key}.json`` (the
original key, and CUB's bounding box, cropped at read time as the official code does). Train with
``data=webdataset data.shards='<out>/train/{00000..NNNNN}.tar'``.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from galip.data.paper_layout import SPLITS, DatasetMissing, PaperLayout, check_files, read_bboxes, read_split
from galip.data.sentences import encode_captions, sent_member, text_fingerprint
from galip.data.shards import IMAGE_EXTS, MANIFEST, encode_image, write_shards
from galip.data.transforms import split_captions

SHARD_NAMES = "{index:05d}.tar"  # img2dataset's naming, so one brace pattern fits both


def shard_key(key: str) -> str:
    """A WebDataset key: no dots (they start the extension) and no slashes (CUB keys have both)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------
def paper_samples(layout: PaperLayout, split: str) -> tuple[int, Iterator[dict[str, Any]]]:
    """(count, samples) of one split of the CUB/COCO layout, every file checked before the first is read."""
    keys = read_split(layout, split)
    check_files(layout, split, keys)
    bboxes = read_bboxes(layout) if layout.dataset == "cub" else {}
    image_dir = layout.image_dir(split)

    def samples():
        for key in keys:
            captions = split_captions(layout.text_path(key).read_text(encoding="utf-8", errors="replace"))
            meta = {"key": key, **({"bbox": bboxes[key]} if key in bboxes else {})}
            yield {
                "key": shard_key(key),
                "image": (image_dir / f"{key}.jpg").read_bytes(),
                "caption": "\n".join(captions),
                "json": meta,
            }

    return len(keys), samples()


def folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    """Every image under `root` with its same-named ``.txt``; an image without one is an error."""
    if not root.is_dir():
        raise DatasetMissing(f"folder not found: {root}")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if not images:
        raise DatasetMissing(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    absent = [p for p in images if not p.with_suffix(".txt").is_file()]
    if absent:
        raise DatasetMissing(
            f"caption file not found: {absent[0].with_suffix('.txt')} ({len(absent)} of {len(images)} images have none)"
        )
    return [(p, p.with_suffix(".txt")) for p in images]


def folder_samples(root: Path) -> tuple[int, Iterator[dict[str, Any]]]:
    pairs = folder_pairs(root)
    keys = [shard_key(str(image.relative_to(root).with_suffix(""))) for image, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two images under {root} map to the same shard key; rename one of them")

    def samples():
        for key, (image, text) in zip(keys, pairs, strict=True):
            is_jpeg = image.suffix.lower() in (".jpg", ".jpeg")
            data = image.read_bytes() if is_jpeg else encode_image(Image.open(image), "jpg")
            captions = split_captions(text.read_text(encoding="utf-8", errors="replace"))
            yield {"key": key, "image": data, "caption": "\n".join(captions), "json": {"key": str(image)}}

    return len(pairs), samples()


# ---------------------------------------------------------------------------------------------------------
# Converting
# ---------------------------------------------------------------------------------------------------------
def convert(
    source: str, root: str | Path, out: str | Path, max_per_shard: int = 1000
) -> dict[str, list[Path]]:
    """``cub``/``coco`` (both splits) or ``folder`` (one ``train`` split) -> ``<out>/<split>/NNNNN.tar``."""
    root, out = Path(root).expanduser(), Path(out).expanduser()
    if source == "folder":
        splits = {"train": folder_samples(root)}
    else:
        layout = PaperLayout(source, root)
        splits = {split: paper_samples(layout, split) for split in SPLITS}  # every split checked first
    written = {}
    for split, (count, samples) in splits.items():
        bar = tqdm(samples, total=count, desc=f"{source} {split}", unit="img")
        written[split] = write_shards(
            bar,
            out / split,
            prefix=split,
            max_per_shard=max_per_shard,
            source=f"{source}:{root}",
            name_format=SHARD_NAMES,
        )
    return written


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


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m galip.data.make_shards", description=__doc__.split("\n")[0]
    )
    parser.add_argument("source", choices=("cub", "coco", "folder"))
    parser.add_argument("--root", required=True, help="the dataset folder (data/birds, data/coco, or pairs)")
    parser.add_argument("--out", required=True, help="output folder: <out>/<split>/NNNNN.tar + manifest.json")
    parser.add_argument("--max-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        written = convert(args.source, args.root, args.out, args.max_per_shard)
    except (DatasetMissing, ValueError) as err:
        print(
            f"galip: data missing: {err}" if isinstance(err, DatasetMissing) else f"galip: {err}",
            file=sys.stderr,
        )
        return 2
    for split, paths in written.items():
        last = len(paths) - 1
        print(
            f"{split}: {len(paths)} shards -> data.shards='{Path(args.out) / split}/{{00000..{last:05d}}}.tar'"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
