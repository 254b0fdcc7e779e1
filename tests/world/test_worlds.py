"""Worlds: which part of the palette a world's scenes use. Validation, the full world's draws pinned (they are
those of every release before worlds existed), jitter, the cross, and the CPU demo's world (data=shapes_demo)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from galip.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    FULL_WORLD,
    JITTER_UNIT,
    POSITION_PHRASES,
    Obj,
    Scene,
    ShapesWorld,
    World,
    sample_scene,
    shape_swaps,
)
from tests.helpers import compose_config, patch_rgb


def _mask(image: Image.Image, background: str) -> np.ndarray:
    """Pixels that are not exactly the background's colour."""
    return (np.asarray(image, dtype=np.int16) != BACKGROUNDS[background]).any(-1)


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------
def test_the_full_world_is_the_default_and_keys_nothing():
    assert World() == FULL_WORLD and FULL_WORLD.is_full and FULL_WORLD.key() is None
    assert World.from_config(None) is FULL_WORLD and World.from_config({}) == FULL_WORLD
    assert World.from_config(FULL_WORLD.as_config()).is_full  # written out in full, still the full world
    assert FULL_WORLD.named == ("shape", "colour", "size", "position")
    one = World(max_objects=1)
    assert not one.is_full and one.key() == one.as_config() and World.from_config(one.key()) == one
    assert World.from_config(one) is one
    assert World(sizes={"small": 0.09, "large": 0.15}) == FULL_WORLD  # a mapping of sizes is accepted
    assert one.vocab()["n_objects"] == ("0", "1") and FULL_WORLD.vocab()["n_objects"] == ("0", "1", "2", "3")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"shapes": ["circle", "hexagon"]}, "world shapes must be distinct names"),
        ({"shapes": ["circle", "circle"]}, "world shapes must be distinct names"),
        ({"colours": []}, "world colours must be distinct names"),
        ({"backgrounds": ["mauve"]}, "world backgrounds must be distinct names"),
        ({"positions": ["middle"]}, "world positions must be distinct names"),
        ({"sizes": {"huge": 0.5}}, r"half-extents in \(0, 0.5\)"),
        # two 0.16-objects on places 0.31 apart would touch; one object alone may be that big
        ({"sizes": {"small": 0.09, "large": 0.16}}, "objects may overlap"),
        # the full world's sizes leave 0.01 between neighbours: one jitter unit (1/64) per object is too much
        ({"jitter": 1}, "objects may overlap"),
        # a large object at the left reaches 0.15 + 3/64 > 0.19 from its centre: out of the image
        ({"max_objects": 1, "jitter": 3}, "an object at 'left' leaves the image"),
        (
            {"positions": ["centre"], "max_objects": 1, "sizes": {"big": 0.32}, "jitter": 12},
            "leaves the image",
        ),
        ({"positions": ["left", "right"], "max_objects": 3}, r"max_objects must be in 1\.\.2 for 2 places"),
        ({"max_objects": 0}, "max_objects must be in 1..3"),
        ({"max_objects": 4}, "max_objects must be in 1..3"),
    ],
)
def test_a_world_that_cannot_be_drawn_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        World.from_config(fields)


def test_the_edges_of_what_a_world_allows_are_accepted():
    World(sizes={"small": 0.09, "large": 0.16}, max_objects=1)  # alone, a 0.16 object overlaps nothing
    World(max_objects=1, jitter=2)  # 0.15 + 2/64 < 0.19
    World(positions=("centre",), max_objects=1, sizes={"big": 0.32}, jitter=11)  # 0.32 + 11/64 < 0.5
    World(positions=("left", "right"), max_objects=2, sizes={"big": 0.18})  # 0.36 < 0.62 apart, 0.18 < 0.19
    assert World(shapes=("cross",)).shapes == ("cross",)  # an extra shape is a shape of the palette


def test_unknown_world_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown world keys \['colors'\]"):
        World.from_config({"colors": ["red"]})


# ---------------------------------------------------------------------------------------------------------
# The full world draws what it always drew (checked against the pre-World scenes.py when worlds came in)
# ---------------------------------------------------------------------------------------------------------
PINNED = {
    ("train", 0): (
        "beige|small red circle@top|large pink circle@centre",
        "two objects on a beige background: a small red circle at the top and a large pink circle in the centre",
    ),
    ("train", 1): (
        "grey|small purple triangle@left|small green diamond@top",
        "a small purple triangle on the left and a small green diamond at the top, on a grey background",
    ),
    ("train", 3): (
        "grey|large yellow square@top|small red diamond@centre|small pink circle@right",
        "a large yellow square at the top, a small red diamond in the centre and a small pink circle on the right,"
        " on a grey background",
    ),
    ("train", 14): (
        "white|small yellow triangle@left|large red triangle@right",
        "a small yellow triangle to the left of a large red triangle on a white background",
    ),
    ("train", 32): (
        "beige|large orange diamond@top|small red circle@centre",
        "a large orange diamond above a small red circle on a beige background",
    ),
    ("val", 1): ("grey|large yellow triangle@top", "a large yellow triangle at the top on a grey background"),
    ("val", 2): (
        "black|large blue square@centre",
        "a black background with a large blue square in the centre",
    ),
    ("test", 1): (
        "white|small orange square@centre|small red circle@bottom|large red square@right",
        "a small orange square in the centre, a small red circle at the bottom and a large red square on the right,"
        " on a white background",
    ),
}
PINNED_ONE_OBJECT = {  # World(max_objects=1): what max_objects=1 drew
    0: ("grey|small blue square@centre", "a small blue square in the centre on a grey background"),
    1: ("black|large pink square@left", "a black background with a large pink square on the left"),
    2: ("black|large purple square@top", "a large purple square at the top on a black background"),
}


@pytest.mark.parametrize(("split", "index"), sorted(PINNED))
def test_the_full_worlds_seed_0_scenes_and_captions_are_unchanged(split, index):
    for world in (None, FULL_WORLD):
        scenes = ShapesWorld(seed=0, split=split, length=index + 1, image_size=16, world=world)
        item = scenes[index]
        assert (scenes.scene(index)[0].spec(), item["caption"]) == PINNED[(split, index)]
        assert item["key"] == f"{split}-0-{index:08d}"


def test_the_one_object_part_of_the_full_world_is_unchanged():
    scenes = ShapesWorld(seed=0, split="train", length=3, image_size=16, world=World(max_objects=1))
    for index, pinned in PINNED_ONE_OBJECT.items():
        assert (scenes.scene(index)[0].spec(), scenes[index]["caption"]) == pinned


# ---------------------------------------------------------------------------------------------------------
# Jitter: an unnamed offset, drawn last
# ---------------------------------------------------------------------------------------------------------
JITTERY = World(positions=("centre",), max_objects=1, sizes={"large": 0.2}, jitter=8)


def test_jitter_moves_the_object_without_naming_it():
    square = Obj("square", "red", "large", "centre", offset=(8, -8))
    assert square.spec() == "large red square@centre+8-8"
    assert replace(square, offset=(0, 0)).spec() == "large red square@centre"
    scene = Scene([square], "white", JITTERY)
    assert scene.caption(0) == "a red square on a white background"  # one size, one place: neither named
    image = scene.render(64)
    cx, cy = 0.5 + 8 * JITTER_UNIT, 0.5 - 8 * JITTER_UNIT
    assert np.allclose(patch_rgb(image, (cx + 0.12, cy)), COLOURS["red"], atol=2)  # inside the moved square
    assert np.allclose(patch_rgb(image, (0.5 - 0.12, 0.5)), BACKGROUNDS["white"], atol=2)  # left the old one
    unmoved = Scene([replace(square, offset=(0, 0))], "white", JITTERY).render(64)
    assert np.allclose(patch_rgb(unmoved, (0.5 - 0.12, 0.5)), COLOURS["red"], atol=2)


def test_jitter_is_drawn_after_everything_else():
    """A world with jitter draws the same objects and background as the same world without it (the offsets
    come last from the rng), each offset a whole number of units within the jitter."""
    still = replace(JITTERY, jitter=0)
    offsets = set()
    for seed in range(30):
        moved, placed = (
            sample_scene(np.random.default_rng(seed), JITTERY),
            sample_scene(np.random.default_rng(seed), still),
        )
        assert [replace(o, offset=(0, 0)) for o in moved.objects] == placed.objects
        assert moved.background == placed.background and placed.objects[0].offset == (0, 0)
        offsets.update(moved.objects[0].offset)
    assert offsets <= set(range(-8, 9)) and len(offsets) > 8


# ---------------------------------------------------------------------------------------------------------
# The CPU demo's world: data=shapes_demo
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    """(world, image size) of the data=shapes_demo preset, composed as a run composes it."""
    cfg = compose_config(["data=shapes_demo"])
    return World.from_config(cfg.data.world), int(cfg.data.image_size)


def test_the_demo_data_preset_composes_to_a_one_place_world(demo):
    from hydra.utils import instantiate

    world, image_size = demo
    assert image_size == 32 and not world.is_full
    assert world.positions == ("centre",) and world.max_objects == 1
    assert (
        "cross" in world.shapes and "position" not in world.named and {"shape", "colour"} <= set(world.named)
    )
    overrides = [
        "data.shards=null",
        "data.n_train=4",
        "data.n_val=4",
        "data.batch_size=2",
        "data.num_workers=0",
    ]
    cfg = compose_config(["data=shapes_demo", *overrides])
    dm = instantiate(cfg.data, tokenizer=lambda captions: torch.zeros(len(captions), 77, dtype=torch.long))
    assert dm.world == world and dm.image_size == 32
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[-2:] == (32, 32) and batch["labels"]["shape"].shape[-1] == 1


def test_data_world_reads_a_data_preset_and_its_overrides(demo):
    from galip.world.artefacts import data_world

    assert data_world() == (FULL_WORLD, 64)
    assert data_world("shapes_demo") == demo
    jittered, size = data_world("shapes_demo", ["data.world.jitter=3", "data.image_size=48"])
    assert jittered == replace(demo[0], jitter=3) and size == 48


def test_the_demo_worlds_captions_match_its_pixels(demo):
    """Each caption names the object's shape, colour (and size, where the world has two) and the background,
    and no place; the object covers the image centre (whatever its jitter) and the background the corner."""
    world, image_size = demo
    scenes = ShapesWorld(seed=0, split="train", length=40, image_size=image_size, world=world)
    seen = set()
    for i in range(len(scenes)):
        scene, _ = scenes.scene(i)
        caption = scenes[i]["caption"]
        (obj,) = scene.objects
        assert f" {obj.shape}" in caption and f" {obj.colour} " in caption
        assert f" {scene.background} background" in caption
        assert (f" {obj.size} " in caption) == ("size" in world.named)
        assert not any(phrase in caption for phrase in POSITION_PHRASES.values()), caption
        image = scene.render(image_size)
        assert np.allclose(patch_rgb(image, (0.5, 0.5), radius=0), COLOURS[obj.colour], atol=2), scene.spec()
        assert np.allclose(patch_rgb(image, (0.03, 0.03)), BACKGROUNDS[scene.background], atol=2)
        seen.add(obj.shape)
    assert seen == set(world.shapes)  # every shape drawn, the cross included


def test_a_cross_is_not_a_square(demo):
    """The cross stays inside its (2h x 2h) box (so it never reaches another place) and differs in pixels from
    every other shape of the same size and colour: at least a tenth of its pixels."""
    world, image_size = demo

    def draw(shape: str, size: str) -> Image.Image:
        return Scene([Obj(shape, "red", size, "centre")], "white", world).render(image_size)

    for size in world.size_names:
        h = world.half_extent(size)
        masks = {
            s: _mask(draw(s, size), "white") for s in ("cross", "square", "circle", "triangle", "diamond")
        }
        cross = masks.pop("cross")
        box = np.zeros_like(cross)
        lo, hi = int(np.floor((0.5 - h) * image_size)), int(np.ceil((0.5 + h) * image_size))
        box[lo:hi, lo:hi] = True
        assert cross.sum() > 0 and not (cross & ~box).any()
        for other, mask in masks.items():
            assert (mask != cross).sum() >= cross.sum() / 10, (size, other)
        cross, square = draw("cross", size), draw("square", size)
        arm, between = (0.5, 0.5 + 0.8 * h), (0.5 + 0.6 * h, 0.5 + 0.6 * h)  # between two arms, in the square
        assert np.allclose(patch_rgb(cross, arm, radius=0), COLOURS["red"], atol=2)
        assert np.allclose(patch_rgb(cross, between, radius=0), BACKGROUNDS["white"], atol=2)
        assert np.allclose(patch_rgb(square, between, radius=0), COLOURS["red"], atol=2)


def test_shape_swaps_use_the_worlds_shapes():
    caption = "a large red cross on a white background"
    swaps = shape_swaps(caption, random.Random(0), ("circle", "square", "triangle", "cross"))
    assert sorted(swaps) == sorted(caption.replace("cross", s) for s in ("circle", "square", "triangle"))
    full = shape_swaps("a small red circle on a grey background", random.Random(0))  # the full world's
    assert {s.split()[3] for s in full} == {"square", "triangle", "diamond"}
    assert shape_swaps("a red crossing on a grey background", random.Random(0), ("cross", "square")) == []
