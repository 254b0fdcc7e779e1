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
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from galip.data.paper_layout import SPLITS, DatasetMissing, PaperLayout, check_files, read_bboxes, read_split
from galip.data.shards import IMAGE_EXTS, encode_image, write_shards
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
