"""DiffAugment translation: exact integer shifts with border pixels shifted in, gradients through it, the
same offsets from the same RNG state, and a training step that actually sees shifted images."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from galip.augment import translate
from tests.helpers import build, compose_config, one_batch_trainer


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_zero_fraction_is_the_identity():
    image = torch.randn(2, 3, 8, 8)
    assert translate(image, 0.0, rng()) is image


def test_each_image_is_an_integer_shift_of_itself_within_the_range():
    # One bright pixel per image, away from the border: it must move by at most 2 px (0.25 × 8) on each axis,
    # unchanged in value, and everything else stays at the (replicated) background.
    b, size, fraction = 64, 8, 0.25
    image = torch.full((b, 3, size, size), -1.0)
    image[:, :, 4, 3] = 1.0
    out = translate(image, fraction, rng())
    assert out.shape == image.shape
    moves = set()
    for i in range(b):
        ys, xs = torch.nonzero(out[i, 0] == 1.0, as_tuple=True)
        assert len(ys) == 1, "a shift moves the pixel, never duplicates or loses it (it stays inside)"
        dy, dx = int(ys[0]) - 4, int(xs[0]) - 3
        assert abs(dy) <= 2 and abs(dx) <= 2
        moves.add((dy, dx))
        assert torch.equal(out[i, :, ys[0], xs[0]], torch.ones(3))
        assert int((out[i] == -1.0).sum()) == 3 * (size * size - 1)
    assert len(moves) > 10, "offsets differ between images and cover the range"


def test_border_pixels_are_replicated_into_the_gap():
    # Left half -1, right half +1: shifting right by k repeats column 0 (value -1) k times, never zeros.
    image = torch.cat([torch.full((16, 1, 8, 4), -1.0), torch.ones(16, 1, 8, 4)], dim=3)
    out = translate(image, 0.25, rng(1))
    assert set(out.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(out[:, :, 0], out[:, :, -1]), "rows are identical: any vertical shift replicates"


def test_gradients_flow_to_the_input():
    image = torch.randn(4, 3, 8, 8, requires_grad=True)
    weight = torch.randn(4, 3, 8, 8)
    (translate(image, 0.25, rng()) * weight).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    # Each output pixel comes from exactly one input pixel: the gradient is a permutation-with-repeats of
    # the weights, so its total equals the weights' total.
    torch.testing.assert_close(image.grad.sum(), weight.sum())


def test_same_generator_state_same_offsets():
    image = torch.randn(8, 3, 16, 16)
    assert torch.equal(translate(image, 0.125, rng(5)), translate(image, 0.125, rng(5)))
    assert not torch.equal(translate(image, 0.125, rng(5)), translate(image, 0.125, rng(6)))


@pytest.mark.parametrize("fraction", [0.0, 0.125])
def test_training_step_feeds_d_shifted_images_only_when_on(fraction, tmp_path):
    module, datamodule = build(
        compose_config(["+experiment=smoke", f"model.augment_translation={fraction}"], output_dir=tmp_path)
    )
    assert module.augment_translation == fraction
    seen: list[torch.Tensor] = []
    original = module.real_taps
    module.real_taps = lambda image: seen.append(image.detach().clone()) or original(image)
    batches: list[torch.Tensor] = []

    class Keep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append(batch["image"].detach().clone())

    trainer = one_batch_trainer(callbacks=[Keep()])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2 and len(seen) == 1
    assert torch.equal(seen[0], batches[0]) == (fraction == 0.0)
    for key in ("d/loss", "g/loss"):
        assert torch.isfinite(trainer.callback_metrics[key])
