"""The embedded world: procedural scenes of coloured shapes with captions and structured labels.

A scene is 1-3 objects (shape, colour, size, position) on a named background. Everything is a pure
function of (seed, split, index), renders at any resolution, and carries integer labels so a classifier
("judge") can later score whether generated images show what their captions say.

Splits never share a scene: a scene's split is decided by a stable hash (blake2b) of its canonical
description (`Scene.spec`), 80/10/10 train/val/test, and each split draws scenes until one hashes into it.
Because the split depends only on the scene, this holds for every seed, length and resolution.

Geometry guarantees no overlap: positions are at least 0.31 of the image side apart (per axis) and two
large objects reach 0.15 + 0.15 = 0.30, so distinct positions are enough.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from galip.data.batch import Tokenized, Tokenizer, collate, pil_to_tensor
from galip.data.resume import ResumableData
from galip.data.shards import check_worker_count, list_shards, shard_dataset, shard_loader, write_shards

# ---------------------------------------------------------------------------------------------------------
# The vocabulary of the world (label ids are indices into these tuples / dict orders)
# ---------------------------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
    "pink": (245, 125, 190),
    "cyan": (40, 200, 210),
}
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "beige": (225, 215, 185),
}
SIZES = {"small": 0.09, "large": 0.15}  # half-extent, as a fraction of the image side
# Reading order (left to right, then top to bottom), which is also the order objects are listed in.
POSITIONS = {
    "left": (0.19, 0.5),
    "top": (0.5, 0.19),
    "centre": (0.5, 0.5),
    "bottom": (0.5, 0.81),
    "right": (0.81, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "top": "at the top",
    "centre": "in the centre",
    "bottom": "at the bottom",
    "right": "on the right",
}
COLOUR_NAMES, BACKGROUND_NAMES = tuple(COLOURS), tuple(BACKGROUNDS)
SIZE_NAMES, POSITION_NAMES = tuple(SIZES), tuple(POSITIONS)
MAX_OBJECTS = 3
N_OBJECTS_PROBS = (0.4, 0.35, 0.25)
SPLITS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}  # intervals of the scene hash
SUPERSAMPLE = 4  # draw at 4x and box-filter down: clean edges, exact colours inside shapes
COUNT_WORDS = ("no", "one", "two", "three")


# ---------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    def spec(self) -> str:
        return f"{self.size} {self.colour} {self.shape}@{self.position}"

    def label_ids(self) -> tuple[int, int, int, int]:
        return (
            SHAPES.index(self.shape),
            COLOUR_NAMES.index(self.colour),
            SIZE_NAMES.index(self.size),
            POSITION_NAMES.index(self.position),
        )


@dataclass
class Scene:
    objects: list[Obj] = field(default_factory=list)
    background: str = "grey"

    def __post_init__(self):
        # A canonical object order makes `spec` (and so the split) independent of construction order.
        self.objects = sorted(self.objects, key=lambda o: POSITION_NAMES.index(o.position))
        assert len({o.position for o in self.objects}) == len(self.objects), "one object per position"

    def spec(self) -> str:
        """Canonical description: equal specs <=> identical scenes."""
        return "|".join([self.background, *(o.spec() for o in self.objects)])

    def split(self) -> str:
        digest = hashlib.blake2b(self.spec().encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        return next(name for name, (lo, hi) in SPLITS.items() if lo <= u < hi)

    def caption(self, template: int | np.random.Generator | None = None) -> str:
        """Caption from one of `TEMPLATES` (an id, a random choice from `rng`, or template 0)."""
        if isinstance(template, np.random.Generator):
            template = int(template.integers(len(TEMPLATES)))
        return TEMPLATES[(template or 0) % len(TEMPLATES)](self)

    def render(self, size: int = 64) -> Image.Image:
        big = size * SUPERSAMPLE
        image = Image.new("RGB", (big, big), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            _draw_object(draw, obj, big)
        return image.resize((size, size), Image.Resampling.BOX)

    def labels(self) -> dict[str, list[int] | int]:
        """Per-slot attribute ids (slots in reading order, -1 = empty slot, i.e. cross-entropy's ignore)."""
        ids = [o.label_ids() for o in self.objects] + [(-1, -1, -1, -1)] * (MAX_OBJECTS - len(self.objects))
        shape, colour, size, position = (list(column) for column in zip(*ids, strict=True))
        return {
            "shape": shape,
            "colour": colour,
            "size": size,
            "position": position,
            "background": BACKGROUND_NAMES.index(self.background),
            "n_objects": len(self.objects),
        }


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, canvas: int) -> None:
    """Every shape stays inside its (2h x 2h) box around the position, which is what rules out overlap."""
    cx, cy = (c * canvas for c in POSITIONS[obj.position])
    h = SIZES[obj.size] * canvas
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif obj.shape == "square":
        s = 0.85 * h  # a full box would look much heavier than the circle of the same size
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def n_objects_probs(max_objects: int = MAX_OBJECTS) -> tuple[float, ...]:
    """P(n objects) for n = 1..max_objects: the world's `N_OBJECTS_PROBS`, cut at ``max_objects`` and renormalised."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    if max_objects == MAX_OBJECTS:
        return N_OBJECTS_PROBS  # as written: the whole world's scenes stay exactly what they were
    head = N_OBJECTS_PROBS[:max_objects]
    return tuple(p / sum(head) for p in head)


def sample_scene(rng: np.random.Generator, max_objects: int = MAX_OBJECTS) -> Scene:
    """A random scene of 1..``max_objects`` objects (the full world: 1-3; the label slots stay `MAX_OBJECTS`)."""
    probs = n_objects_probs(max_objects)
    n = int(rng.choice(np.arange(1, max_objects + 1), p=probs))
    positions = rng.choice(len(POSITION_NAMES), size=n, replace=False)
    objects = [
        Obj(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
            size=SIZE_NAMES[rng.integers(len(SIZE_NAMES))],
            position=POSITION_NAMES[p],
        )
        for p in positions
    ]
    return Scene(objects, BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))])


# ---------------------------------------------------------------------------------------------------------
# Caption templates: each names every attribute of every object
# ---------------------------------------------------------------------------------------------------------
def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _placed(scene: Scene) -> str:
    return _join([f"{o.phrase()} {POSITION_PHRASES[o.position]}" for o in scene.objects])


def _relation(a: Obj, b: Obj) -> str | None:
    """How `a` sits relative to `b`, when they share a row or a column (diagonals would be vague)."""
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    if ay == by:
        return "to the left of" if ax < bx else "to the right of"
    if ax == bx:
        return "above" if ay < by else "below"
    return None


def _plain(scene: Scene) -> str:
    comma = "," if len(scene.objects) > 1 else ""  # keeps the last position apart from the background
    return f"{_placed(scene)}{comma} on a {scene.background} background"


def _background_first(scene: Scene) -> str:
    return f"a {scene.background} background with {_placed(scene)}"


def _counted(scene: Scene) -> str:
    n = len(scene.objects)
    noun = "object" if n == 1 else "objects"
    return f"{COUNT_WORDS[n]} {noun} on a {scene.background} background: {_placed(scene)}"


def _relational(scene: Scene) -> str:
    """Relative placement ("a small red circle to the left of ...") for pairs in a row/column."""
    if len(scene.objects) != 2 or _relation(*scene.objects) is None:
        return _plain(scene)
    a, b = scene.objects
    return f"{a.phrase()} {_relation(a, b)} {b.phrase()} on a {scene.background} background"


TEMPLATES = (_plain, _background_first, _counted, _relational)


# ---------------------------------------------------------------------------------------------------------
# Hard negatives: the caption with one shape word changed
# ---------------------------------------------------------------------------------------------------------
SHAPE_WORDS = re.compile("|".join(SHAPES))


def shape_swaps(caption: str, rng: random.Random) -> list[str]:
    """The caption with one of its shape words (picked by ``rng``) replaced by each of the other shapes.

    Hard negatives: captions that match the image in everything but one object's shape. Plain in-batch
    contrast never needs shape (colour, background and position already tell 128 scenes apart), and a CLIP
    that cannot tell a circle from a square gives GALIP's generator no reason to draw either.
    """
    found = list(SHAPE_WORDS.finditer(caption))
    if not found:
        return []
    return _each_other(caption, rng.choice(found), SHAPES)


def _each_other(caption: str, word: re.Match, options: tuple[str, ...]) -> list[str]:
    """The caption with the matched ``word`` replaced by each of the other ``options``."""
    return [caption[: word.start()] + o + caption[word.end() :] for o in options if o != word.group()]


POSITION_WORDS = re.compile("|".join(POSITION_PHRASES.values()))
RELATIONS = ("to the left of", "to the right of", "above", "below")
RELATION_WORDS = re.compile("|".join(RELATIONS))


def position_swaps(caption: str, rng: random.Random) -> list[str]:
    """The caption with one object's place (picked by ``rng``) changed to each other place.

    Hard negatives for where things are: plain in-batch contrast never needs it (colour and background
    already tell 128 scenes apart), and a CLIP whose sentence vector does not say where an object is
    gives GALIP's generator no reason to put it there. A place phrase ("on the left") becomes each of the
    four others, and where the caption places several objects, one more negative exchanges that object's
    place with another object's (the same words, bound the other way round). In the relational template
    ("a … to the left of a …") the relation becomes each of the three others. A caption naming no place
    gives ``[]``.
    """
    for words, options in ((POSITION_WORDS, tuple(POSITION_PHRASES.values())), (RELATION_WORDS, RELATIONS)):
        found = list(words.finditer(caption))
        if not found:
            continue
        word = rng.choice(found)
        swaps = _each_other(caption, word, options)
        if len(found) > 1:
            other = rng.choice([w for w in found if w is not word])
            first, second = sorted((word, other), key=lambda w: w.start())
            swaps.append(
                caption[: first.start()]
                + second.group()
                + caption[first.end() : second.start()]
                + first.group()
                + caption[second.end() :]
            )
        return swaps
    return []


def shape_swap(caption: str, rng: random.Random) -> str | None:
    """One hard negative: the caption with one shape word (picked by ``rng``) changed to another shape;
    ``None`` when the caption names no shape. GALIP's D uses these as extra mismatched pairs
    (``model.hard_negatives``): in-batch mismatches differ in colour and background, never only in shape."""
    swaps = shape_swaps(caption, rng)
    return rng.choice(swaps) if swaps else None


def shape_or_position_swap(caption: str, rng: random.Random) -> str | None:
    """One hard negative for D: a `shape_swaps` or a `position_swaps` caption (which kind: ``rng``, even odds)."""
    kinds = [shape_swaps, position_swaps]
    rng.shuffle(kinds)
    for swaps in (kind(caption, rng) for kind in kinds):
        if swaps:
            return rng.choice(swaps)
    return None


# ---------------------------------------------------------------------------------------------------------
# Dataset, shards, data module
# ---------------------------------------------------------------------------------------------------------
class ShapesWorld(Dataset):
    """`length` scenes of one split: {image [-1,1] (3,S,S), caption, labels (dict of long tensors), key}.

    ``max_objects`` < 3 draws from the part of the world with at most that many objects per scene (the same
    scenes, captions and splits; the object count renormalised); 3 is the whole world.
    """

    def __init__(
        self,
        seed: int = 0,
        split: str = "train",
        length: int = 10_000,
        image_size: int = 64,
        max_objects: int = MAX_OBJECTS,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        n_objects_probs(max_objects)  # validates
        self.seed, self.split, self.length, self.image_size = seed, split, length, image_size
        self.max_objects = max_objects

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, np.random.Generator]:
        """The index-th scene of this split (and the rng, positioned to pick its caption template)."""
        rng = np.random.default_rng((self.seed, list(SPLITS).index(self.split), index))
        while True:  # rejection: ~1.25 draws for train, ~10 for val/test, all cheap (no rendering)
            scene = sample_scene(rng, self.max_objects)
            if scene.split() == self.split:
                return scene, rng

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene, rng = self.scene(index)
        return {
            "image": pil_to_tensor(scene.render(self.image_size)),
            "caption": scene.caption(rng),
            "labels": {k: torch.tensor(v, dtype=torch.long) for k, v in scene.labels().items()},
            "key": f"{self.split}-{self.seed}-{index:08d}",
        }

    def shard_samples(self):
        """Samples in `write_shards` form: PNG-ready image, caption, labels and spec in the json."""
        for index in range(self.length):
            scene, rng = self.scene(index)
            yield {
                "key": f"{self.split}-{self.seed}-{index:08d}",
                "image": scene.render(self.image_size),
                "caption": scene.caption(rng),
                "json": {"labels": scene.labels(), "scene": scene.spec()},
            }


def write_shapes_shards(
    out_dir: str | Path,
    counts: dict[str, int],
    seed: int = 0,
    image_size: int = 64,
    max_per_shard: int = 1000,
    max_objects: int = MAX_OBJECTS,
) -> dict[str, list[Path]]:
    """Render each split (e.g. {'train': 50_000, 'val': 1000}) to lossless PNG shards under `out_dir`."""
    return {
        split: write_shards(
            ShapesWorld(seed, split, n, image_size, max_objects).shard_samples(),
            out_dir,
            prefix=split,
            max_per_shard=max_per_shard,
            image_format="png",
            source=f"galip.world.scenes seed={seed} image_size={image_size} max_objects={max_objects}",
        )
        for split, n in counts.items()
    }


class ShapesDataModule(ResumableData, L.LightningDataModule):
    """Shapes world rendered in memory, or streamed from shards written by `write_shapes_shards`.

    From shards, training resamples shards forever and cuts `n_train` samples per epoch, split evenly so
    every rank gets the same number of batches; val/test read their shards once, in order.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_size: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        n_train: int = 10_000,
        n_val: int = 512,
        seed: int = 0,
        shards: str | Path | None = None,
        shuffle_buffer: int = 1000,
        max_objects: int = MAX_OBJECTS,
    ):
        super().__init__()
        n_objects_probs(max_objects)  # validates
        self.max_objects = max_objects
        self.tokenizer = tokenizer
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.n_train, self.n_val, self.seed = n_train, n_val, seed
        self.shards, self.shuffle_buffer = shards, shuffle_buffer

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _world(self, split: str, length: int) -> Dataset:
        return Tokenized(
            ShapesWorld(self.seed, split, length, self.image_size, self.max_objects), self.tokenizer
        )

    def _memory_loader(self, split: str, length: int, train: bool) -> DataLoader:
        sampler = self.train_sampler(length, self.seed) if train else None
        return DataLoader(
            self._world(split, length),
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def _samples_per_worker(self) -> int:
        workers = max(1, self.num_workers)
        batches_per_rank = max(1, self.n_train // (self.world_size * self.batch_size))
        return -(-batches_per_rank // workers) * self.batch_size  # ceil, whole batches per worker

    def _train_shard_loader(self) -> DataLoader:
        dataset = shard_dataset(
            list_shards(self.shards, "train"),
            self.tokenizer,
            self.image_size,
            resampled=True,
            shuffle_buffer=self.shuffle_buffer,
            epoch_length=self._samples_per_worker(),
            seed=self.stream_seed(self.seed),
        )
        return shard_loader(dataset, self.batch_size, self.num_workers, drop_last=True)

    def _eval_shard_loader(self, split: str) -> DataLoader:
        urls = list_shards(self.shards, split)
        check_worker_count(len(urls), 1, self.world_size)
        workers = min(self.num_workers, len(urls) // self.world_size)  # no worker may be left without a shard
        dataset = shard_dataset(urls, self.tokenizer, self.image_size, resampled=False)
        return shard_loader(dataset, self.batch_size, workers, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        if self.shards:
            return self._train_shard_loader()
        return self._memory_loader("train", self.n_train, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.shards:
            return self._eval_shard_loader("val")
        return self._memory_loader("val", self.n_val, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.shards:
            return self._eval_shard_loader("test")
        return self._memory_loader("test", self.n_val, train=False)
