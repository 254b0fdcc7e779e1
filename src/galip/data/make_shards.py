"""Convert image + caption pairs to WebDataset shards (the img2dataset layout).

::

    python -m galip.data.make_shards cub     --root data/birds --out shards/cub
    python -m galip.data.make_shards coco    --root data/coco  --out shards/coco
    python -m galip.data.make_shards folder  --root my_pairs   --out shards/mine   # a.jpg + a.txt, any depth
    python -m galip.data.make_shards csv     --root pairs.csv  --out shards/mine   # image,caption columns
    python -m galip.data.make_shards tsv|parquet --root pairs.tsv|pairs.parquet --out shards/mine

Each split goes to ``<out>/<split>/{00000,00001,...}.tar`` with a ``manifest.json`` beside it (kept sample and
caption counts, skipped pairs by reason, source). A sample is ``{key}.jpg``, ``{key}.txt`` (every caption of
the image, one per line; the reader draws one per item) and ``{key}.json`` (the original key, and CUB's
bounding box, cropped at read time as the official code does). Train with
``data=webdataset data.shards='<out>/train/{00000..NNNNN}.tar'``.

Every image is decoded once here. A pair that cannot be used (image or caption missing, caption empty or not
UTF-8, image that does not decode) is skipped and counted by reason, the first few named in the log; nothing
unusable reaches the shards, so the manifest's counts are what training reads. ``--strict`` stops at the
first such pair instead.

The image member: an upright 8-bit RGB or grey JPEG no larger than ``--max-side`` keeps its original bytes
(no second lossy generation, and CUB/COCO shards decode to exactly the pixels the folder loader reads);
anything else (PNG, WebP, CMYK, 16-bit, transparency, palette, an EXIF rotation, more pixels than needed) is
made upright 8-bit RGB (`galip.data.images.to_rgb`) and re-encoded as a quality-95 JPEG, as img2dataset
does, so the reader never meets a mode it would decode wrongly. CUB and COCO keep their stored pixels and
size (their bounding boxes and captions refer to them, and the official code ignores EXIF).
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from galip.data.images import (
    DECODE_ERRORS,
    decode_image,
    orientation,
    shorter_side_at_most,
    to_rgb,
    upright,
)
from galip.data.paper_layout import SPLITS, DatasetMissing, PaperLayout, missing, read_bboxes, read_split
from galip.data.shards import encode_image, write_shards
from galip.data.transforms import split_captions

log = logging.getLogger(__name__)

SHARD_NAMES = "{index:05d}.tar"  # img2dataset's naming, so one brace pattern fits both
FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLES = {"csv": ",", "tsv": "\t", "parquet": None}
# Why a pair was skipped, as the manifest and the log name it.
REASONS = {
    "missing_image": "image file not found",
    "missing_caption": "caption not found",
    "empty_caption": "caption is empty",
    "unreadable_caption": "caption is not UTF-8",
    "undecodable_image": "image does not decode",
    "duplicate_key": "another image already has this shard key",
}


class ConvertError(ValueError):
    """A conversion that cannot go ahead as asked; the message is one line."""


def shard_key(key: str) -> str:
    """A WebDataset key: no dots (they start the extension) and no slashes (CUB keys have both)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


# ---------------------------------------------------------------------------------------------------------
# Pairs, and what is wrong with them
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One would-be sample: its image file and its captions (a ``.txt`` to read, or the captions themselves)."""

    key: str
    image: Path | None
    text: Path | list[str] | None
    meta: dict[str, Any] = field(default_factory=dict)


class Skip(Exception):
    """Why one pair cannot be used: a `REASONS` key, and a detail for the log."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass
class Skipped:
    """Pairs left out of a split, counted by reason; the first `named` are named in the log."""

    strict: bool = False
    named: int = 5
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, pair: Pair, skip: Skip) -> None:
        where = pair.image or (pair.text if isinstance(pair.text, Path) else pair.key)
        message = f"{where}: {REASONS[skip.reason]}" + (f" ({skip.detail})" if skip.detail else "")
        if self.strict:
            raise ConvertError(f"--strict: {message}")
        self.counts[skip.reason] += 1
        if self.total <= self.named:
            log.warning("skipped %s", message)
        if self.total == self.named:
            log.warning("(further skips are counted in manifest.json, not named)")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items())) or "none"


# ---------------------------------------------------------------------------------------------------------
# Reading one pair
# ---------------------------------------------------------------------------------------------------------
def read_captions(text: Path | list[str] | None) -> list[str]:
    """A ``.txt`` (one caption per line: CRLF, blank lines, surrounding space and a BOM are fine) or table
    cells (one caption each; inner line breaks become spaces). Text that is not UTF-8 is skipped, not guessed:
    a wrong guess would train on mojibake that no count reveals."""
    if text is None:
        raise Skip("missing_caption")
    if isinstance(text, Path):
        if not text.is_file():
            raise Skip("missing_caption", f"no {text.name}")
        try:
            captions = split_captions(text.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as err:
            raise Skip("unreadable_caption", f"byte {err.start}") from None
    else:
        cells = [c.lstrip("\ufeff") for c in text if isinstance(c, str)]
        if any(_has_surrogates(c) for c in cells):
            raise Skip("unreadable_caption")
        captions = [" ".join(c.split()) for c in cells if c.strip()]
    if not captions:
        raise Skip("empty_caption")
    return captions


def _has_surrogates(text: str) -> bool:
    """Bytes a table could not decode as UTF-8 (read with ``surrogateescape``) become lone surrogates."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


@dataclass(frozen=True)
class ImagePolicy:
    """How images become shard members: `upright` applies EXIF orientation; `max_side` caps the shorter side
    (0: no cap). Paper datasets keep their stored pixels (``PAPER``); photo folders and tables are made
    upright and capped."""

    upright: bool = True
    max_side: int = 1024

    def member(self, path: Path | None) -> bytes:
        """The JPEG bytes stored for the image at `path` (its own bytes when they can be, see the module doc)."""
        if path is None or not path.is_file():
            raise Skip("missing_image")
        data = path.read_bytes()
        try:
            image = decode_image(data, self.max_side)
            if self._keeps(image):
                return data
            image = to_rgb(upright(image) if self.upright else image)
        except DECODE_ERRORS as err:
            raise Skip("undecodable_image", decode_failure(data, err)) from None
        return encode_image(shorter_side_at_most(image, self.max_side), "jpg")

    def _keeps(self, image: Image.Image) -> bool:
        return (
            image.format == "JPEG"
            and image.mode in ("RGB", "L")
            and not (self.upright and orientation(image) != 1)
            and not (self.max_side and min(image.size) > self.max_side)
        )


PAPER = ImagePolicy(upright=False, max_side=0)


def decode_failure(data: bytes, err: BaseException) -> str:
    """Why `data` did not decode, in a few words for the log."""
    if not data:
        return "empty file"
    if isinstance(err, UnidentifiedImageError):
        return f"not an image format Pillow reads; starts with {data[:12]!r}"
    return f"{type(err).__name__}: {err}"


def usable(pairs: Iterable[Pair], policy: ImagePolicy, skipped: Skipped) -> Iterator[dict[str, Any]]:
    """The samples of the pairs that can be used; the others are counted in `skipped`."""
    seen: set[str] = set()
    for pair in pairs:
        try:
            if pair.key in seen:
                raise Skip("duplicate_key", pair.key)
            captions = read_captions(pair.text)
            image = policy.member(pair.image)
        except Skip as skip:
            skipped.add(pair, skip)
            continue
        seen.add(pair.key)
        yield {"key": pair.key, "image": image, "caption": "\n".join(captions), "json": pair.meta}


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------
def paper_pairs(layout: PaperLayout, split: str) -> list[Pair]:
    """One split of the CUB/COCO layout; its folders and lists must exist, a missing file is a skip."""
    keys = read_split(layout, split)
    if not (layout.root / "text").is_dir():
        raise missing("caption folder", layout.root / "text", layout.dataset)
    bboxes = read_bboxes(layout) if layout.dataset == "cub" else {}
    image_dir = layout.image_dir(split)
    return [
        Pair(
            shard_key(key),
            image_dir / f"{key}.jpg",
            layout.text_path(key),
            {"key": key, **({"bbox": bboxes[key]} if key in bboxes else {})},
        )
        for key in keys
    ]


def folder_pairs(root: Path) -> list[Pair]:
    """Every image under `root` with its same-named ``.txt``, and every ``.txt`` without an image."""
    if not root.is_dir():
        raise DatasetMissing(f"folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in FOLDER_IMAGE_EXTS]
    texts = {p.with_suffix("") for p in files if p.suffix == ".txt"}
    if not images and not texts:
        raise DatasetMissing(f"no images ({' '.join(FOLDER_IMAGE_EXTS)}) or captions (.txt) under {root}")
    pairs = [_folder_pair(root, image, image.with_suffix(".txt")) for image in images]
    orphans = texts - {p.with_suffix("") for p in images}
    return pairs + [_folder_pair(root, None, stem.with_suffix(".txt")) for stem in sorted(orphans)]


def _folder_pair(root: Path, image: Path | None, text: Path) -> Pair:
    name = (image or text).relative_to(root)
    return Pair(shard_key(str(name.with_suffix(""))), image, text, {"key": str(name)})


def table_pairs(path: Path, kind: str, image_col: str, caption_col: str) -> list[Pair]:
    """Rows of a csv/tsv/parquet table; rows naming the same image are one sample with several captions.

    Image paths are relative to the table's folder (or absolute)."""
    if not path.is_file():
        raise DatasetMissing(f"{kind} file not found: {path}")
    columns = read_table(path, kind, (image_col, caption_col))
    captions: dict[str, list[str]] = {}
    for image, caption in zip(columns[image_col], columns[caption_col], strict=True):
        captions.setdefault(str(image or "").strip(), []).append(caption)
    return [_table_pair(path.parent, image, cells) for image, cells in captions.items()]


def _table_pair(folder: Path, image: str, cells: list[str]) -> Pair:
    key = shard_key(str(Path(image).with_suffix(""))) if image else "row-without-image"
    return Pair(key, folder / image if image else None, cells, {"key": image})


def read_table(path: Path, kind: str, wanted: tuple[str, ...]) -> dict[str, list[Any]]:
    """The `wanted` columns: name -> values. Text that is not UTF-8 is kept as lone surrogates, so
    `read_captions` can skip just those rows."""
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConvertError(
                "reading parquet needs pyarrow: pip install 'galip[parquet]' (or pip install pyarrow)"
            ) from None
        check_columns(path, pq.read_schema(path).names, wanted)
        return pq.read_table(path, columns=list(wanted)).to_pydict()
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        rows = list(csv.reader(f, delimiter=TABLES[kind]))
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    check_columns(path, header, wanted)
    return {name: [row[i] if i < len(row) else None for row in body] for i, name in enumerate(header)}


def check_columns(path: Path, names: list[str], wanted: tuple[str, ...]) -> None:
    for col in wanted:
        if col not in names:
            raise ConvertError(
                f"{path} has no column {col!r} (it has {', '.join(map(repr, names))}); "
                "name them with --image-col and --caption-col"
            )


# ---------------------------------------------------------------------------------------------------------
# Converting
# ---------------------------------------------------------------------------------------------------------
def source_splits(
    source: str, root: Path, image_col: str = "image", caption_col: str = "caption"
) -> dict[str, list[Pair]]:
    """``cub``/``coco``: both splits (every one checked before the first is written); others: ``train``."""
    if source == "folder":
        return {"train": folder_pairs(root)}
    if source in TABLES:
        return {"train": table_pairs(root, source, image_col, caption_col)}
    layout = PaperLayout(source, root)
    return {split: paper_pairs(layout, split) for split in SPLITS}


def convert(
    source: str,
    root: str | Path,
    out: str | Path,
    max_per_shard: int = 1000,
    strict: bool = False,
    max_side: int = 1024,
    image_col: str = "image",
    caption_col: str = "caption",
) -> dict[str, list[Path]]:
    """Pairs of `source` -> ``<out>/<split>/NNNNN.tar`` (+ ``manifest.json``); returns the shards per split.

    Unusable pairs are skipped and counted in the manifest (``skipped``), or, `strict`, stop the conversion.
    A split with no usable pair at all is an error.
    """
    root, out = Path(root).expanduser(), Path(out).expanduser()
    policy = PAPER if source in ("cub", "coco") else ImagePolicy(upright=True, max_side=max_side)
    written = {}
    for split, pairs in source_splits(source, root, image_col, caption_col).items():
        skipped = Skipped(strict=strict)
        bar = tqdm(pairs, desc=f"{source} {split}", unit="img")
        written[split] = write_shards(
            usable(bar, policy, skipped),
            out / split,
            prefix=split,
            max_per_shard=max_per_shard,
            source=f"{source}:{root}",
            name_format=SHARD_NAMES,
            skipped=skipped.counts,
        )
        kept = len(pairs) - skipped.total
        log.info("%s: kept %d of %d pairs; skipped: %s", split, kept, len(pairs), skipped.summary())
        if not kept:
            raise ConvertError(f"{split}: no usable pair under {root} (skipped: {skipped.summary()})")
    return written


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m galip.data.make_shards", description=__doc__.split("\n")[0]
    )
    parser.add_argument("source", choices=("cub", "coco", "folder", *TABLES))
    parser.add_argument(
        "--root", required=True, help="the dataset folder (data/birds, data/coco, pairs) or table file"
    )
    parser.add_argument("--out", required=True, help="output folder: <out>/<split>/NNNNN.tar + manifest.json")
    parser.add_argument("--max-per-shard", type=int, default=1000)
    parser.add_argument("--strict", action="store_true", help="stop at the first unusable pair")
    parser.add_argument(
        "--max-side",
        type=int,
        default=1024,
        help="folder/tables: shrink larger images to this shorter side (0: keep every size)",
    )
    parser.add_argument("--image-col", default="image", help="tables: the column of image paths")
    parser.add_argument("--caption-col", default="caption", help="tables: the column of captions")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = {k: getattr(args, k) for k in ("strict", "max_side", "image_col", "caption_col")}
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            written = convert(args.source, args.root, args.out, args.max_per_shard, **options)
    except (DatasetMissing, ConvertError) as err:
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
