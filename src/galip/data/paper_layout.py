"""CUB-200-2011 and COCO-2014 in the folder layout of the official code (docs/official_code.md#data-layout).

::

    birds/                                        coco/
      CUB_200_2011/images/<key>.jpg                 images/train2014/jpg/<key>.jpg   (or images/train2014/)
      CUB_200_2011/images.txt, bounding_boxes.txt   images/val2014/jpg/<key>.jpg     (or images/val2014/)
      text/<key>.txt       (10 captions)            text/<key>.txt                   (~5 captions)
      train/filenames.pickle, test/filenames.pickle train/filenames.pickle, test/filenames.pickle

Every folder, list and per-key file is checked when the data module is built: a missing one stops the run
with one line naming the path and where it comes from, never an empty dataset that trains on nothing. A file
that is there but does not read (a corrupt JPEG) is skipped and counted at read time, as on shards.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from galip.data.batch import Loader, Tokenizer, collate, tokenize_one
from galip.data.images import DECODE_ERRORS, decode_image
from galip.data.resume import ResumableData
from galip.data.sentences import SentenceTable, cache_path, load_table, training_clip_fingerprint
from galip.data.shards import CorruptSample, SkipCounter
from galip.data.transforms import choose_caption, paper_transform, split_captions

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
SOURCES = {
    "cub": "CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ and the DF-GAN "
    "birds metadata (text/, train/, test/) from https://github.com/tobran/DF-GAN#preparation; see docs/data.md",
    "coco": "train2014.zip/val2014.zip from https://cocodataset.org/#download and the DF-GAN coco metadata "
    "(text/, train/, test/) from https://github.com/tobran/DF-GAN#preparation; see docs/data.md",
}


class DatasetMissing(FileNotFoundError):
    """A dataset folder or file is not where the layout expects it; the message is one line."""


def missing_data_cause(err: BaseException | None) -> DatasetMissing | None:
    """`err` or the `DatasetMissing` in its cause chain (Hydra's instantiate wraps what the target raised)."""
    while err is not None and not isinstance(err, DatasetMissing):
        err = err.__cause__ or err.__context__
    return err


def missing(what: str, path: str | Path, dataset: str) -> DatasetMissing:
    return DatasetMissing(f"{dataset} {what} not found: {path} (get it from {SOURCES[dataset]})")


# ---------------------------------------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperLayout:
    """Paths of one dataset (``cub`` or ``coco``) under `root`, as the official code reads them."""

    dataset: str
    root: Path

    def __post_init__(self):
        if self.dataset not in SOURCES:
            raise ValueError(f"dataset must be one of {tuple(SOURCES)}, got {self.dataset!r}")
        object.__setattr__(self, "root", Path(self.root).expanduser())

    def split_file(self, split: str) -> Path:
        return self.root / split / "filenames.pickle"

    def text_path(self, key: str) -> Path:
        return self.root / "text" / f"{key}.txt"

    def image_dir_candidates(self, split: str) -> list[Path]:
        if self.dataset == "cub":
            return [self.root / "CUB_200_2011" / "images"]
        folder = self.root / "images" / ("train2014" if split == "train" else "val2014")
        return [folder / "jpg", folder]  # the official code reads the extra jpg/ level; its README does not

    def image_dir(self, split: str) -> Path:
        candidates = self.image_dir_candidates(split)
        found = next((d for d in candidates if d.is_dir()), None)
        if found is None:
            raise missing("image folder", " or ".join(map(str, candidates)), self.dataset)
        return found

    def image_path(self, split: str, key: str) -> Path:
        return self.image_dir(split) / f"{key}.jpg"


class _ListsOnly(pickle.Unpickler):
    """Split lists are plain lists of strings: refuse anything that would import code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"filenames.pickle may only hold a list of strings, not {module}.{name}")


def read_split(layout: PaperLayout, split: str) -> list[str]:
    path = layout.split_file(split)
    if not path.is_file():
        raise missing(f"{split} split list", path, layout.dataset)
    with open(path, "rb") as f:
        keys = _ListsOnly(f, encoding="latin1").load()  # latin1: the metadata was pickled by Python 2
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    if not keys:
        raise DatasetMissing(f"{layout.dataset} {split} split list {path} is empty")
    return keys


def read_bboxes(layout: PaperLayout) -> dict[str, list[float]]:
    """CUB key -> [x, y, w, h] from ``images.txt`` (id path) and ``bounding_boxes.txt`` (id x y w h)."""
    folder = layout.root / "CUB_200_2011"
    for name in ("images.txt", "bounding_boxes.txt"):
        if not (folder / name).is_file():
            raise missing("bounding boxes", folder / name, layout.dataset)
    paths = dict(line.split(maxsplit=1) for line in (folder / "images.txt").read_text().splitlines() if line)
    boxes = {}
    for line in (folder / "bounding_boxes.txt").read_text().splitlines():
        if line.strip():
            image_id, *box = line.split()
            boxes[os.path.splitext(paths[image_id].strip())[0]] = [float(v) for v in box]
    return boxes


def check_files(layout: PaperLayout, split: str, keys: list[str]) -> None:
    """Every key has its image and caption file (a few stat calls per key: about a second for COCO)."""
    if not (layout.root / "text").is_dir():
        raise missing("caption folder", layout.root / "text", layout.dataset)
    image_dir = layout.image_dir(split)
    for what, path_of in (("image", lambda k: image_dir / f"{k}.jpg"), ("caption file", layout.text_path)):
        absent = [path_of(k) for k in keys if not path_of(k).is_file()]
        if absent:
            raise missing(
                f"{split} {what} ({len(absent)} of {len(keys)} missing, first)", absent[0], layout.dataset
            )


# ---------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------
class PaperLayoutDataset(Dataset):
    """One split: {image [-1, 1] (3, S, S), caption (one of the key's), tokens, key[, sent_emb]}.

    train: random crop + flip and a random caption per item; otherwise the centre crop and a caption fixed
        by the item's index. sentences: cached sentence vectors for this split and CLIP (optional).
    """

    def __init__(
        self,
        layout: PaperLayout,
        split: str,
        tokenizer: Tokenizer,
        image_size: int = 256,
        train: bool = True,
        sentences: SentenceTable | None = None,
    ):
        self.layout, self.split, self.tokenizer = layout, split, tokenizer
        self.image_size, self.train, self.sentences = image_size, train, sentences
        self.keys = read_split(layout, split)
        check_files(layout, split, self.keys)
        self.image_dir = layout.image_dir(split)
        self.bboxes = read_bboxes(layout) if layout.dataset == "cub" else None
        self.skips = SkipCounter()  # per loader worker; the batches carry the counts (``skipped``)

    def __len__(self) -> int:
        return len(self.keys)

    def captions(self, key: str) -> list[str]:
        captions = split_captions(self.layout.text_path(key).read_text(encoding="utf-8", errors="replace"))
        if not captions:
            raise DatasetMissing(f"no caption in {self.layout.text_path(key)}")
        return captions

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item `index`; one that does not read (a corrupt JPEG, an emptied caption file) is skipped and
        counted (``skipped``, logged as ``data/skipped``, as on shards) and the next readable item stands in,
        so every batch stays full and every rank runs the same number of batches."""
        position, image, captions = self._readable(index)
        key = self.keys[position]
        choice = choose_caption(len(captions), self.train, position)
        bbox = self.bboxes[key] if self.bboxes is not None else None
        sample = {
            "image": paper_transform(image, self.image_size, self.train, bbox),
            "caption": captions[choice],
            "tokens": tokenize_one(self.tokenizer, captions[choice]),
            "key": key,
            # Only `index` itself counts: a stand-in that fails is counted when its own index is drawn.
            "skipped": int(position != index),
        }
        if self.sentences is not None:
            sample["sent_emb"] = self.sentences.lookup(key, captions, choice)
        return sample

    def _readable(self, index: int) -> tuple[int, Image.Image, list[str]]:
        """(position, decoded image, captions) of `index`, or of the first readable item after it."""
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            key = self.keys[position]
            try:
                return (
                    position,
                    decode_image((self.image_dir / f"{key}.jpg").read_bytes()),
                    self.captions(key),
                )
            except DECODE_ERRORS as err:
                self.skips(CorruptSample(f"{key!r} in {self.image_dir}: {err!r}"))
        raise DatasetMissing(f"no readable image in {self.layout.dataset} {self.split} ({self.image_dir})")


# ---------------------------------------------------------------------------------------------------------
# Data module
# ---------------------------------------------------------------------------------------------------------
class PaperLayoutDataModule(ResumableData, L.LightningDataModule):
    """CUB or COCO for training (``train`` split) and evaluation (``test`` split, = COCO val2014).

    Args:
        dataset: ``cub`` or ``coco``; root: the folder of the layout above (``data/birds``, ``data/coco``).
        sent_cache: read cached sentence vectors when `python -m galip.data.encode_text` wrote them for the
            training CLIP (looked up by its fingerprint in `sent_cache_dir`, default ``<root>/sent_emb``).
        n_val: evaluate on the first `n_val` test images only (None: all of them).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        dataset: str,
        root: str | Path,
        image_size: int = 256,
        batch_size: int = 64,
        num_workers: int = 4,
        seed: int = 0,
        sent_cache: bool = True,
        sent_cache_dir: str | Path | None = None,
        n_val: int | None = None,
    ):
        super().__init__()
        self.tokenizer, self.layout = tokenizer, PaperLayout(dataset, root)
        self.image_size, self.batch_size, self.num_workers, self.seed = (
            image_size,
            batch_size,
            num_workers,
            seed,
        )
        self.sent_cache, self.n_val = sent_cache, n_val
        self.sent_cache_dir = Path(sent_cache_dir) if sent_cache_dir else self.layout.root / "sent_emb"
        # Built (and so checked) now: a missing file stops the run before the trainer starts.
        self.datasets = {split: self._dataset(split) for split in SPLITS}

    def _dataset(self, split: str) -> PaperLayoutDataset:
        return PaperLayoutDataset(self.layout, split, self.tokenizer, self.image_size, train=split == "train")

    def setup(self, stage: str | None = None) -> None:
        fingerprint = training_clip_fingerprint(self.trainer) if self.sent_cache else None
        if fingerprint is not None:
            for split, dataset in self.datasets.items():
                dataset.sentences = load_table(self.sent_cache_dir, split, fingerprint)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        sampler = self.train_sampler(len(dataset), self.seed)
        return self._loader(dataset, sampler=sampler, shuffle=sampler is None, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        dataset = self.datasets["test"]
        if self.n_val is not None:
            dataset = Subset(dataset, range(min(self.n_val, len(dataset))))
        return self._loader(dataset, sampler=None, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], sampler=None, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return Loader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    # -- the sentence-vector cache (python -m galip.data.encode_text) -----------------------------

    def encode_sentences(self, clip, batch_size: int = 256) -> list[Path]:
        """Encode every caption of both splits with `clip` and write the caches; returns their paths."""
        paths = []
        for split, dataset in self.datasets.items():
            keys, captions = readable_captions(dataset)
            table = SentenceTable.build(clip, keys, captions, batch_size)
            paths.append(table.save(cache_path(self.sent_cache_dir, split, table.fingerprint)))
        return paths


def readable_captions(dataset: PaperLayoutDataset) -> tuple[list[str], list[list[str]]]:
    """(keys, captions) of the items whose caption file reads; the others are left out of the cache and
    logged, as the loader skips and counts them in training (a key fixed later is then a stale-cache error)."""
    keys, captions, unreadable = [], [], []
    for key in dataset.keys:
        try:
            captions.append(dataset.captions(key))
            keys.append(key)
        except DECODE_ERRORS as err:
            unreadable.append(str(err))
    if unreadable:
        log.warning(
            f"{dataset.layout.dataset} {dataset.split}: {len(unreadable)} of {len(dataset.keys)} caption files "
            f"have no readable caption, left out of the cache (training skips them too); first: {unreadable[0]}"
        )
    return keys, captions
