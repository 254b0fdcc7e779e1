"""The embedded world: procedural scenes of coloured shapes with captions and structured labels.

A scene is 1-3 objects (shape, colour, size, position) on a named background. Everything is a pure
function of (seed, split, index), renders at any resolution, and carries integer labels so a classifier
("judge") can later score whether generated images show what their captions say.

A `World` picks which shapes, colours, backgrounds, sizes and places its scenes use and how many objects they
hold: the full world (the default, every word below) is the long setting; a config's ``data.world`` names
smaller ones, such as the CPU demo's (``data=shapes_demo``). Captions name what varies in their world.

Splits never share a scene: a scene's split is decided by a stable hash (blake2b) of its canonical
description (`Scene.spec`), 80/10/10 train/val/test, and each split draws scenes until one hashes into it.
Because the split depends only on the scene, this holds for every seed, length and resolution.

Geometry guarantees no overlap: `World` refuses sizes and jitter that could make two objects touch (in the
full world positions are at least 0.31 of the image side apart per axis and two large objects reach 0.30).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from galip.data.batch import Tokenized, Tokenizer, pil_to_tensor
from galip.data.resume import ResumableData
from galip.data.shards import check_worker_count, list_shards, shard_dataset, shard_loader, write_shards

# ---------------------------------------------------------------------------------------------------------
# The palette every world draws from (a world picks names out of these)
# ---------------------------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond")
EXTRA_SHAPES = ("cross",)  # drawable, not in the full world: a silhouette unlike any rotation of the others
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
JITTER_UNIT = 1 / 64  # an object's unnamed offset from its place is a whole number of these (per axis)
SLOT_ATTRIBUTES = ("shape", "colour", "size", "position")  # per object, in `Obj.label_ids` order


# ---------------------------------------------------------------------------------------------------------
# Worlds: which part of the palette a world's scenes use
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """What a world's scenes are made of; the default is the full world (1-3 objects, every word above).

    A caption names every attribute that varies in its world, and only those: in a world with one place
    (``positions: [centre]``) no caption says where the object is, and the judge is not asked.

    Args:
        shapes, colours, backgrounds: names from `SHAPES` + `EXTRA_SHAPES`, `COLOURS`, `BACKGROUNDS`.
        sizes: size name -> half-extent as a fraction of the image side.
        positions: place names from `POSITIONS`.
        max_objects: objects per scene at most (the label slots); 1..min(3, len(positions)).
        jitter: each object's centre moves by up to this many `JITTER_UNIT`s per axis (uniform, whole units,
            never named in the caption); 0 keeps objects exactly on their place.
    """

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOUR_NAMES
    backgrounds: tuple[str, ...] = BACKGROUND_NAMES
    sizes: tuple[tuple[str, float], ...] = tuple(SIZES.items())
    positions: tuple[str, ...] = POSITION_NAMES
    max_objects: int = MAX_OBJECTS
    jitter: int = 0

    def __post_init__(self):
        sizes = self.sizes.items() if isinstance(self.sizes, Mapping) else self.sizes
        object.__setattr__(self, "sizes", tuple((str(k), float(v)) for k, v in sizes))
        for name in ("shapes", "colours", "backgrounds", "positions"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
        for name, values, known in (
            ("shapes", self.shapes, SHAPES + EXTRA_SHAPES),
            ("colours", self.colours, COLOUR_NAMES),
            ("backgrounds", self.backgrounds, BACKGROUND_NAMES),
            ("positions", self.positions, POSITION_NAMES),
        ):
            if not values or len(set(values)) != len(values) or not set(values) <= set(known):
                raise ValueError(f"world {name} must be distinct names from {known}, got {list(values)}")
        if not self.sizes or any(not 0 < h < 0.5 for _, h in self.sizes):
            raise ValueError(f"world sizes must be half-extents in (0, 0.5), got {dict(self.sizes)}")
        if not 1 <= self.max_objects <= min(MAX_OBJECTS, len(self.positions)):
            raise ValueError(
                f"max_objects must be in 1..{min(MAX_OBJECTS, len(self.positions))} for "
                f"{len(self.positions)} places, got {self.max_objects}"
            )
        self._check_geometry()

    def _check_geometry(self) -> None:
        """Every object stays inside the image, and objects at two places never overlap."""
        reach = max(h for _, h in self.sizes) + self.jitter * JITTER_UNIT
        for p in self.positions:
            if min(*POSITIONS[p], *(1 - c for c in POSITIONS[p])) < reach:
                raise ValueError(f"an object at {p!r} leaves the image: size + jitter reach {reach:.3f}")
        if self.max_objects > 1:
            places = [POSITIONS[p] for p in self.positions]
            gap = min(
                max(abs(a - c), abs(b - d)) for i, (a, b) in enumerate(places) for c, d in places[i + 1 :]
            )
            if 2 * reach > gap:
                raise ValueError(f"objects may overlap: two reach {2 * reach:.3f} > {gap:.3f} between places")

    @classmethod
    def from_config(cls, config: World | Mapping[str, Any] | None) -> World:
        """A `World` from itself, a mapping of its fields (a config's ``data.world``) or ``None`` (the full world)."""
        if config is None or isinstance(config, World):
            return config or FULL_WORLD
        if OmegaConf.is_config(config):
            config = OmegaConf.to_container(config, resolve=True)
        unknown = set(config) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown world keys {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**config)

    @property
    def is_full(self) -> bool:
        return self == FULL_WORLD

    def key(self) -> dict[str, Any] | None:
        """The world's part of an artefact's cache key: ``None`` for the full world (keys made before worlds
        existed stay valid), else every field."""
        return None if self.is_full else self.as_config()

    def as_config(self) -> dict[str, Any]:
        return {
            "shapes": list(self.shapes),
            "colours": list(self.colours),
            "backgrounds": list(self.backgrounds),
            "sizes": dict(self.sizes),
            "positions": list(self.positions),
            "max_objects": self.max_objects,
            "jitter": self.jitter,
        }

    @property
    def size_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sizes)

    def half_extent(self, size: str) -> float:
        return dict(self.sizes)[size]

    def vocab(self) -> dict[str, tuple[str, ...]]:
        """Label names per attribute: class ids in `Scene.labels` are indices into these tuples."""
        return {
            "shape": self.shapes,
            "colour": self.colours,
            "size": self.size_names,
            "position": self.positions,
            "background": self.backgrounds,
            # ids are counts; 0 never occurs but keeps id == count
            "n_objects": tuple(str(n) for n in range(self.max_objects + 1)),
        }

    @property
    def named(self) -> tuple[str, ...]:
        """The object attributes captions name (those with more than one value), in `SLOT_ATTRIBUTES` order."""
        vocab = self.vocab()
        return tuple(a for a in SLOT_ATTRIBUTES if len(vocab[a]) > 1)


FULL_WORLD = World()


# ---------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str
    offset: tuple[int, int] = (0, 0)  # unnamed jitter, in JITTER_UNITs (x, y)

    def phrase(self, world: World = FULL_WORLD) -> str:
        words = [w for a, w in (("size", self.size), ("colour", self.colour)) if a in world.named]
        return " ".join(["a", *words, self.shape])

    def spec(self) -> str:
        jitter = "" if self.offset == (0, 0) else "{:+d}{:+d}".format(*self.offset)
        return f"{self.size} {self.colour} {self.shape}@{self.position}{jitter}"

    def label_ids(self, world: World = FULL_WORLD) -> tuple[int, int, int, int]:
        return (
            world.shapes.index(self.shape),
            world.colours.index(self.colour),
            world.size_names.index(self.size),
            world.positions.index(self.position),
        )


@dataclass
class Scene:
    objects: list[Obj] = field(default_factory=list)
    background: str = "grey"
    world: World = field(default=FULL_WORLD, compare=False, repr=False)

    def __post_init__(self):
        # A canonical object order makes `spec` (and so the split) independent of construction order.
        self.objects = sorted(self.objects, key=lambda o: POSITION_NAMES.index(o.position))
        assert len({o.position for o in self.objects}) == len(self.objects), "one object per position"

    def spec(self) -> str:
        """Canonical description: equal specs <=> identical scenes (within one world)."""
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
            _draw_object(draw, obj, big, self.world.half_extent(obj.size))
        return image.resize((size, size), Image.Resampling.BOX)

    def labels(self) -> dict[str, list[int] | int]:
        """Per-slot attribute ids (slots in reading order, -1 = empty slot, i.e. cross-entropy's ignore)."""
        slots = self.world.max_objects
        ids = [o.label_ids(self.world) for o in self.objects] + [(-1, -1, -1, -1)] * (
            slots - len(self.objects)
        )
        shape, colour, size, position = (list(column) for column in zip(*ids, strict=True))
        return {
            "shape": shape,
            "colour": colour,
            "size": size,
            "position": position,
            "background": self.world.backgrounds.index(self.background),
            "n_objects": len(self.objects),
        }


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, canvas: int, half_extent: float) -> None:
    """Every shape stays inside its (2h x 2h) box around the position, which is what rules out overlap."""
    cx, cy = (
        (c + d * JITTER_UNIT) * canvas for c, d in zip(POSITIONS[obj.position], obj.offset, strict=True)
    )
    h = half_extent * canvas
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
    elif obj.shape == "cross":
        a = 0.36 * h  # half the arm's width: a plus sign as heavy as the circle
        draw.rectangle([cx - h, cy - a, cx + h, cy + a], fill=fill)
        draw.rectangle([cx - a, cy - h, cx + a, cy + h], fill=fill)
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


def sample_scene(rng: np.random.Generator, world: World = FULL_WORLD) -> Scene:
    """A random scene of ``world`` (the full world: 1-3 objects; its draws are those of every earlier release)."""
    probs = n_objects_probs(world.max_objects)
    n = int(rng.choice(np.arange(1, world.max_objects + 1), p=probs))
    positions = rng.choice(len(world.positions), size=n, replace=False)
    objects = [
        Obj(
            shape=world.shapes[rng.integers(len(world.shapes))],
            colour=world.colours[rng.integers(len(world.colours))],
            size=world.size_names[rng.integers(len(world.sizes))],
            position=world.positions[p],
        )
        for p in positions
    ]
    background = world.backgrounds[rng.integers(len(world.backgrounds))]
    if world.jitter:  # drawn after everything else, so a world without jitter draws as it always did
        j = world.jitter
        objects = [replace(o, offset=tuple(int(v) for v in rng.integers(-j, j + 1, size=2))) for o in objects]
    return Scene(objects, background, world)


# ---------------------------------------------------------------------------------------------------------
# Caption templates: each names every attribute of every object
# ---------------------------------------------------------------------------------------------------------
def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _placed(scene: Scene) -> str:
    """Each object's phrase, with its place when the world has more than one."""
    if "position" not in scene.world.named:
        return _join([o.phrase(scene.world) for o in scene.objects])
    return _join([f"{o.phrase(scene.world)} {POSITION_PHRASES[o.position]}" for o in scene.objects])


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
    return f"{a.phrase(scene.world)} {_relation(a, b)} {b.phrase(scene.world)} on a {scene.background} background"


TEMPLATES = (_plain, _background_first, _counted, _relational)


# ---------------------------------------------------------------------------------------------------------
# Hard negatives: the caption with one shape word changed
# ---------------------------------------------------------------------------------------------------------
SHAPE_WORDS = re.compile(r"\b(" + "|".join(SHAPES + EXTRA_SHAPES) + r")\b")


def shape_swaps(caption: str, rng: random.Random, shapes: Sequence[str] = SHAPES) -> list[str]:
    """The caption with one of its shape words (picked by ``rng``) replaced by each other of ``shapes``
    (the world's shapes).

    Hard negatives: captions that match the image in everything but one object's shape. Plain in-batch
    contrast never needs shape (colour, background and position already tell 128 scenes apart), and a CLIP
    that cannot tell a circle from a square gives GALIP's generator no reason to draw either.
    """
    found = list(SHAPE_WORDS.finditer(caption))
    if not found:
        return []
    word = rng.choice(found)
    return [caption[: word.start()] + o + caption[word.end() :] for o in shapes if o != word.group()]


# ---------------------------------------------------------------------------------------------------------
# Dataset, shards, data module
# ---------------------------------------------------------------------------------------------------------
class ShapesWorld(Dataset):
    """`length` scenes of one split: {image [-1,1] (3,S,S), caption, labels (dict of long tensors), key}.

    ``world``: a `World`, a mapping of its fields (a config's ``data.world``) or ``None``, the full world.
    """

    def __init__(
        self,
        seed: int = 0,
        split: str = "train",
        length: int = 10_000,
        image_size: int = 64,
        world: World | Mapping[str, Any] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        self.seed, self.split, self.length, self.image_size = seed, split, length, image_size
        self.world = World.from_config(world)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, np.random.Generator]:
        """The index-th scene of this split (and the rng, positioned to pick its caption template)."""
        rng = np.random.default_rng((self.seed, list(SPLITS).index(self.split), index))
        while True:  # rejection: ~1.25 draws for train, ~10 for val/test, all cheap (no rendering)
            scene = sample_scene(rng, self.world)
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
    world: World | Mapping[str, Any] | None = None,
) -> dict[str, list[Path]]:
    """Render each split (e.g. {'train': 50_000, 'val': 1000}) to lossless PNG shards under `out_dir`."""
    return {
        split: write_shards(
            ShapesWorld(seed, split, n, image_size, world).shard_samples(),
            out_dir,
            prefix=split,
            max_per_shard=max_per_shard,
            image_format="png",
            source=f"galip.world.scenes seed={seed} image_size={image_size} world={World.from_config(world).key()}",
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
        world: World | Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.world = World.from_config(world)
        self.tokenizer = tokenizer
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.n_train, self.n_val, self.seed = n_train, n_val, seed
        self.shards, self.shuffle_buffer = shards, shuffle_buffer

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _world(self, split: str, length: int) -> Dataset:
        return Tokenized(ShapesWorld(self.seed, split, length, self.image_size, self.world), self.tokenizer)

    def _memory_loader(self, split: str, length: int, train: bool) -> DataLoader:
        return self.map_loader(self._world(split, length), self.seed, train)

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
