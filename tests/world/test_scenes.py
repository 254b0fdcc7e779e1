"""The embedded world's scenes: determinism, caption/pixel agreement, splits, shard sets, datamodule."""

import numpy as np
import open_clip
import pytest
import torch

from galip.data import check_batch
from galip.world import artefacts
from galip.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SIZES,
    Obj,
    Scene,
    ShapesDataModule,
    ShapesWorld,
    World,
    n_objects_probs,
    sample_scene,
    write_shapes_shards,
)
from tests.helpers import patch_rgb


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def test_shapes_world_is_deterministic():
    a, b = ShapesWorld(seed=3, length=5), ShapesWorld(seed=3, length=5)
    for i in range(5):
        scene_a, scene_b = a.scene(i)[0], b.scene(i)[0]
        assert scene_a.render(64).tobytes() == scene_b.render(64).tobytes()
        assert a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["image"], b[i]["image"])
    assert ShapesWorld(seed=4, length=1)[0]["key"] != a[0]["key"]


@pytest.mark.parametrize("size", [32, 64, 128])
def test_renders_at_any_resolution(size):
    image = ShapesWorld(length=1, image_size=size)[0]["image"]
    assert image.shape == (3, size, size)


@pytest.mark.parametrize(
    "obj, background",
    [
        (Obj("circle", "red", "small", "left"), "grey"),
        (Obj("triangle", "green", "large", "top"), "white"),
        (Obj("square", "blue", "small", "right"), "black"),
        (Obj("diamond", "yellow", "large", "bottom"), "beige"),
        (Obj("triangle", "purple", "small", "centre"), "grey"),
    ],
)
def test_pixels_match_the_caption(obj, background):
    scene = Scene([obj], background)
    caption = scene.caption(0)
    assert obj.colour in caption and obj.shape in caption and background in caption
    image = scene.render(64)
    assert np.allclose(patch_rgb(image, POSITIONS[obj.position]), COLOURS[obj.colour], atol=2)
    assert np.allclose(patch_rgb(image, (0.03, 0.03)), BACKGROUNDS[background], atol=2)


def test_each_object_of_a_scene_is_drawn_where_labelled():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = sample_scene(rng)
        image = scene.render(64)
        for obj in scene.objects:
            assert np.allclose(patch_rgb(image, POSITIONS[obj.position]), COLOURS[obj.colour], atol=2)


def test_objects_never_overlap():
    reach = 2 * max(SIZES.values())
    centres = list(POSITIONS.values())
    for i, (ax, ay) in enumerate(centres):
        for bx, by in centres[i + 1 :]:
            assert max(abs(ax - bx), abs(ay - by)) > reach


def test_splits_never_share_a_scene():
    specs = {
        split: {ShapesWorld(seed, split, 150).scene(i)[0].spec() for seed in (0, 1) for i in range(150)}
        for split in ("train", "val", "test")
    }
    assert not specs["train"] & specs["val"]
    assert not specs["train"] & specs["test"]
    assert not specs["val"] & specs["test"]
    val = ShapesWorld(0, "val", 20)
    assert all(val.scene(i)[0].split() == "val" for i in range(20))


def test_a_world_of_fewer_objects_draws_the_simpler_part_of_the_full_world():
    one = ShapesWorld(seed=0, split="val", length=40, world=World(max_objects=1))
    two = ShapesWorld(seed=0, split="val", length=80, world={"max_objects": 2})  # a config's mapping
    assert {len(one.scene(i)[0].objects) for i in range(40)} == {1}
    assert {len(two.scene(i)[0].objects) for i in range(80)} == {1, 2}
    for i in range(5):  # still the full world's words and splits; one label slot per object it may hold
        scene = one.scene(i)[0]
        assert scene.split() == "val"
        assert one[i]["labels"]["shape"].shape == (1,) and two[i]["labels"]["shape"].shape == (2,)
        assert one[i]["labels"]["position"].item() == World().positions.index(scene.objects[0].position)
        assert " ".join(scene.objects[0].spec().split("@")[0].split()) in one[i]["caption"]
    # the full world is what it was: None, World() and its mapping keep N_OBJECTS_PROBS as written
    default = ShapesWorld(seed=0, length=30)
    for full in (ShapesWorld(seed=0, length=30, world=World()), ShapesWorld(seed=0, length=30, world={})):
        assert [default.scene(i)[0].spec() for i in range(30)] == [full.scene(i)[0].spec() for i in range(30)]
    assert n_objects_probs(1) == (1.0,)
    assert n_objects_probs(2) == pytest.approx((0.4 / 0.75, 0.35 / 0.75))
    with pytest.raises(ValueError, match="max_objects"):
        ShapesWorld(world={"max_objects": 4})


def test_shard_keys_name_the_world_only_when_it_is_not_the_full_one(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(artefacts, "artefact_dir", lambda kind, config: written.append(config) or tmp_path)
    monkeypatch.setattr(artefacts, "write_shapes_shards", lambda *a, **k: written.append(k))
    monkeypatch.setattr(artefacts, "write_config", lambda *a: None)
    one = World(max_objects=1)
    for world in (None, World(), {}, one, {"max_objects": 1}):
        artefacts.ensure_shapes_shards(8, 4, 16, 0, world=world)
    keys, writes = written[0::2], written[1::2]
    assert (
        keys[0] == keys[1] == keys[2] == {"n_train": 8, "n_val": 4, "image_size": 16, "seed": 0, "format": 1}
    )
    assert keys[3] == keys[4] == {**keys[0], "world": one.key()}
    assert one.key()["max_objects"] == 1 and "max_objects" not in keys[3]  # the old spelling is gone
    assert [w["world"] for w in writes] == [World(), World(), World(), one, one]
    # and the string form the config resolver passes: a world mapping from the composed config
    assert artefacts.shapes_shards("8", "4", "16", "0", None) == str(tmp_path)
    assert written[-2] == keys[0]


def test_shapes_datamodule_in_memory_and_from_shards(tmp_path, tokenizer):
    write_shapes_shards(tmp_path, {"train": 12, "val": 6}, image_size=32, max_per_shard=4)
    memory = ShapesDataModule(tokenizer, image_size=32, batch_size=4, n_train=12, n_val=6)
    streamed = ShapesDataModule(tokenizer, image_size=32, batch_size=4, n_train=12, shards=str(tmp_path))
    for dm in (memory, streamed):
        dm.setup("fit")
        train = list(dm.train_dataloader())
        assert len(train) == 3
        for batch in train + list(dm.val_dataloader()):
            check_batch(batch)
    val_memory = torch.cat([b["image"] for b in memory.val_dataloader()])
    val_streamed = torch.cat([b["image"] for b in streamed.val_dataloader()])
    assert torch.equal(val_memory, val_streamed)
