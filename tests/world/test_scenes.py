"""The embedded world's scenes: determinism, caption/pixel agreement, splits, swaps, shard sets, datamodule."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

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
    n_objects_probs,
    position_swaps,
    sample_scene,
    shape_or_position_swap,
    shape_swaps,
    write_shapes_shards,
)


def _patch_rgb(image: Image.Image, xy: tuple[float, float], radius: int = 1) -> np.ndarray:
    x, y = (round(c * image.width) for c in xy)
    pixels = np.asarray(image, dtype=np.float32)
    return pixels[y - radius : y + radius + 1, x - radius : x + radius + 1].reshape(-1, 3).mean(0)


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
    assert np.allclose(_patch_rgb(image, POSITIONS[obj.position]), COLOURS[obj.colour], atol=2)
    assert np.allclose(_patch_rgb(image, (0.03, 0.03)), BACKGROUNDS[background], atol=2)


def test_each_object_of_a_scene_is_drawn_where_labelled():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = sample_scene(rng)
        image = scene.render(64)
        for obj in scene.objects:
            assert np.allclose(_patch_rgb(image, POSITIONS[obj.position]), COLOURS[obj.colour], atol=2)


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


def test_max_objects_draws_the_simpler_part_of_the_world():
    one = ShapesWorld(seed=0, split="val", length=40, max_objects=1)
    two = ShapesWorld(seed=0, split="val", length=80, max_objects=2)
    assert {len(one.scene(i)[0].objects) for i in range(40)} == {1}
    assert {len(two.scene(i)[0].objects) for i in range(80)} == {1, 2}
    for i in range(5):  # still the world: same splits, labels in the same three slots
        scene = one.scene(i)[0]
        assert scene.split() == "val"
        assert one[i]["labels"]["shape"].tolist()[1:] == [-1, -1]
    # the whole world is what it was: max_objects=3 keeps N_OBJECTS_PROBS as written
    default, full = ShapesWorld(seed=0, length=30), ShapesWorld(seed=0, length=30, max_objects=3)
    assert [default.scene(i)[0].spec() for i in range(30)] == [full.scene(i)[0].spec() for i in range(30)]
    assert n_objects_probs(1) == (1.0,)
    assert n_objects_probs(2) == pytest.approx((0.4 / 0.75, 0.35 / 0.75))
    with pytest.raises(ValueError, match="max_objects"):
        ShapesWorld(max_objects=4)


def test_shard_keys_name_max_objects_only_below_the_whole_world(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(artefacts, "artefact_dir", lambda kind, config: written.append(config) or tmp_path)
    monkeypatch.setattr(artefacts, "write_shapes_shards", lambda *a, **k: written.append(k))
    monkeypatch.setattr(artefacts, "write_config", lambda *a: None)
    artefacts.ensure_shapes_shards(8, 4, 16, 0)
    artefacts.ensure_shapes_shards(8, 4, 16, 0, max_objects=1)
    assert "max_objects" not in written[0] and written[1]["max_objects"] == 3
    assert written[2]["max_objects"] == 1 and written[3]["max_objects"] == 1


def test_shape_or_position_swap_changes_one_of_the_two():
    import random

    caption = "a small red circle on the left and a large blue square at the top, on a grey background"
    drawn = [shape_or_position_swap(caption, random.Random(i)) for i in range(40)]
    every_shape = {c for i in range(40) for c in shape_swaps(caption, random.Random(i))}
    every_place = {c for i in range(40) for c in position_swaps(caption, random.Random(i))}
    assert set(drawn) <= every_shape | every_place
    assert set(drawn) & every_shape and set(drawn) & every_place
    assert shape_or_position_swap("a red thing", random.Random(0)) is None


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
