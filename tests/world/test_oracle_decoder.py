"""galip.world.oracle_decoder: the one-hot layout says what the scene holds, and the loop trains and judges."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from galip.world import oracle_decoder
from galip.world.scenes import Obj, Scene, ShapesWorld, World

FULL_LAYOUT = 5 * (1 + 4 + 8 + 2) + 4  # five places of (occupied, shape, colour, size), then the background


def _labels(scene: Scene) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in scene.labels().items()}


def test_layout_onehot_marks_each_object_at_its_place():
    scene = Scene(
        [Obj("triangle", "blue", "large", "right"), Obj("circle", "red", "small", "left")], background="black"
    )
    onehot = oracle_decoder.layout_onehot(_labels(scene))
    assert onehot.shape == (FULL_LAYOUT,)
    places = onehot[:75].view(5, 15)
    # places in POSITIONS order: left, top, centre, bottom, right; within one: occupied, 4 shapes, 8 colours, 2 sizes
    left = torch.zeros(15)
    left[[0, 1 + 0, 5 + 0, 13 + 0]] = 1  # circle, red, small
    right = torch.zeros(15)
    right[[0, 1 + 2, 5 + 2, 13 + 1]] = 1  # triangle, blue, large
    assert torch.equal(places[0], left) and torch.equal(places[4], right)
    assert places[1:4].sum() == 0
    assert torch.equal(onehot[75:], torch.tensor([0.0, 0.0, 1.0, 0.0]))  # grey, white, black, beige


def test_decoder_shapes_and_sizes():
    cond = torch.zeros(3, FULL_LAYOUT)
    assert oracle_decoder.OracleDecoder(cond.shape[1], 64, ngf=4)(cond).shape == (3, 3, 64, 64)
    assert oracle_decoder.OracleDecoder(cond.shape[1], 32, ngf=4)(cond).shape == (3, 3, 32, 32)


def test_layout_onehot_of_a_smaller_world_has_its_blocks():
    """A world's layout: one block per place of that world, over that world's words."""
    world = World(
        shapes=("circle", "cross"), colours=("red", "blue", "green"), backgrounds=("white", "black"),
        positions=("left", "right"), max_objects=2, sizes={"only": 0.1},
    )  # fmt: skip
    scene = Scene([Obj("cross", "green", "only", "right")], background="black", world=world)
    onehot = oracle_decoder.layout_onehot(_labels(scene), world)
    assert onehot.shape == (2 * (1 + 2 + 3 + 1) + 2,)
    right = torch.tensor([1.0, 0, 1, 0, 0, 1, 1])  # occupied, cross, green, only
    assert torch.equal(onehot[:7], torch.zeros(7)) and torch.equal(onehot[7:14], right)
    assert torch.equal(onehot[14:], torch.tensor([0.0, 1.0]))  # black


@pytest.mark.parametrize(
    ("world", "image_size"),
    [(None, 64), (World(positions=("centre",), max_objects=1), 32)],
    ids=["full", "one_place"],
)
def test_run_lowers_the_loss_and_reports_the_judge(world, image_size):
    from galip.world.judge import Judge

    torch.manual_seed(0)
    judge = Judge(image_size, widths=(8, 8), feature_dim=16, depth=1, hidden_dim=16, world=world).eval()
    results = oracle_decoder.run(
        steps=40, batch_size=8, image_size=image_size, world=world, n_train=32, n_val=8, eval_every=20, ngf=4,
        judge=judge, log=lambda _: None,
    )  # fmt: skip  # a random judge: only the plumbing
    assert [r["step"] for r in results] == [20, 40]
    assert {"acc_shape", "acc_colour", "fd", "kimg"} <= results[-1].keys()
    assert ("acc_position" in results[-1]) == (world is None)  # a one-place world's captions never name it
    assert results[-1]["kimg"] == 0.3
    assert results[-1]["loss"] < results[0]["loss"]
    table = oracle_decoder.markdown(results)
    assert table.count("\n") == 3 and "acc_shape" in table


def test_clip_vector_scalings():
    from galip.world.artefacts import shapes_clip

    clip = shapes_clip()  # the full world's 64-px CLIP, shipped
    world = ShapesWorld(0, "train", 40, 64, World(max_objects=1))
    items = [world[i] for i in range(len(world))]
    captions = [it["caption"] for it in items]
    encoded = {
        v: oracle_decoder._encoder(clip, items[:4], v, items)[1](captions) for v in oracle_decoder.VECTORS
    }
    raw = encoded["raw"]
    assert raw.shape == (40, 64) and raw.norm(dim=-1).min() > 2  # not unit: what GALIP's G gets
    torch.testing.assert_close(encoded["unit"], raw / raw.norm(dim=-1, keepdim=True))
    standard = encoded["standardised"]  # over the same captions: zero mean, unit spread per dimension
    torch.testing.assert_close(standard.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(standard.std(0), torch.ones(64), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="vector='sphere'"):
        oracle_decoder._encoder(clip, items[:4], "sphere", items)
    with pytest.raises(ValueError, match="needs the training items"):
        oracle_decoder._encoder(clip, items[:4], "standardised")


def test_cli_draws_the_world_of_a_data_preset_through_its_clip(monkeypatch, capsys):
    """``--data shapes_demo --world data.world.jitter=3 --condition clip``: the preset's world with the override,
    at the preset's image size, through the CLIP pretrained on that preset (``+experiment=shapes_demo_clip``)."""
    from galip.world.artefacts import data_world

    calls = []
    monkeypatch.setattr(oracle_decoder, "shapes_clip", lambda experiment: f"<{experiment}>")
    monkeypatch.setattr(oracle_decoder, "run", lambda *args, **kw: calls.append((args, kw)) or [])
    oracle_decoder.main(["--data", "shapes_demo", "--world", "data.world.jitter=3", "--condition", "clip"])
    oracle_decoder.main(["--steps", "5"])
    (condition, steps, _, image_size, world, _), kw = calls[0]
    demo, demo_size = data_world("shapes_demo")
    assert (condition, steps, image_size, world) == (
        "<shapes_demo_clip>",
        800,
        demo_size,
        replace(demo, jitter=3),
    )
    (condition, steps, _, image_size, world, _), _ = calls[1]
    assert (condition, steps, image_size, world) == ("onehot", 5, 64, World())
    assert "python -m galip.world.oracle_decoder --steps 5" in capsys.readouterr().out
