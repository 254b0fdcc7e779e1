"""galip.world.oracle_decoder: the one-hot layout says what the scene holds, and the loop trains and judges."""

from __future__ import annotations

import pytest
import torch

from galip.world import oracle_decoder
from galip.world.scenes import Obj, Scene


def _labels(scene: Scene) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in scene.labels().items()}


def test_layout_onehot_marks_each_object_at_its_place():
    scene = Scene(
        [Obj("triangle", "blue", "large", "right"), Obj("circle", "red", "small", "left")], background="black"
    )
    onehot = oracle_decoder.layout_onehot(_labels(scene))
    assert onehot.shape == (oracle_decoder.LAYOUT_DIM,) == (5 * 15 + 4,)
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
    cond = torch.zeros(3, oracle_decoder.LAYOUT_DIM)
    assert oracle_decoder.OracleDecoder(cond.shape[1], 64, ngf=4)(cond).shape == (3, 3, 64, 64)
    assert oracle_decoder.OracleDecoder(cond.shape[1], 32, ngf=4)(cond).shape == (3, 3, 32, 32)


def test_run_lowers_the_loss_and_reports_the_judge():
    from galip.world.judge import Judge

    judge = Judge(
        64, widths=(8, 8), feature_dim=16, depth=1, hidden_dim=16
    ).eval()  # random: only the plumbing
    results = oracle_decoder.run(
        steps=40, batch_size=8, n_train=32, n_val=8, eval_every=20, ngf=4, judge=judge, log=lambda _: None
    )
    assert [r["step"] for r in results] == [20, 40]
    assert {"acc_shape", "acc_colour", "fd", "kimg"} <= results[-1].keys()
    assert results[-1]["kimg"] == 0.3
    assert results[-1]["loss"] < results[0]["loss"]
    table = oracle_decoder.markdown(results)
    assert table.count("\n") == 3 and "acc_shape" in table


def test_clip_vector_scalings():
    from galip.world.scenes import ShapesWorld

    world = ShapesWorld(0, "train", 40, 64, 1)
    items = [world[i] for i in range(len(world))]
    captions = [it["caption"] for it in items]
    encoded = {
        v: oracle_decoder._encoder("clip", items[:4], v, items)[1](captions) for v in oracle_decoder.VECTORS
    }
    raw = encoded["raw"]
    assert raw.shape == (40, 64) and raw.norm(dim=-1).min() > 2  # not unit: what GALIP's G gets
    torch.testing.assert_close(encoded["unit"], raw / raw.norm(dim=-1, keepdim=True))
    standard = encoded["standardised"]  # over the same captions: zero mean, unit spread per dimension
    torch.testing.assert_close(standard.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(standard.std(0), torch.ones(64), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="vector='sphere'"):
        oracle_decoder._encoder("clip", items[:4], "sphere", items)
    with pytest.raises(ValueError, match="needs the training items"):
        oracle_decoder._encoder("clip", items[:4], "standardised")
