"""The EMA of G's weights: the update against the hand formula (half-life, ramp-up), the update as training runs
it, and every consumer of a trained G (sample grids, export, sampling, evaluation) reading the EMA weights, which
differ from G's after training."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from galip import evaluate
from galip.checkpoints import read_export
from galip.loading import load_generator
from tests.helpers import build, compose_config, one_batch_trainer, train_in


def ema_module(tmp_path, half_life_kimg: float, rampup: float | None):
    cfg = compose_config(
        [
            "+experiment=smoke",
            f"model.ema_half_life_kimg={half_life_kimg}",
            f"+model.ema_rampup={'null' if rampup is None else rampup}",
        ],
        output_dir=tmp_path,
    )
    return build(cfg)


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def set_flat(module: torch.nn.Module, values: torch.Tensor) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(values[: p.numel()].view_as(p))
            values = values[p.numel() :]


def test_after_one_half_life_of_images_the_ema_is_halfway(tmp_path):
    """No ramp-up: β = 0.5^(images / half-life) per update, so after half-life images in any number of updates the
    distance to a fixed G has halved, and after two half-lives it is a quarter."""
    module, _ = ema_module(tmp_path, half_life_kimg=0.1, rampup=None)
    g, e0 = flat(module.generator), flat(module.generator_ema) + 1.0  # EMA 1 away from G everywhere
    set_flat(module.generator_ema, e0)
    for batch, halvings in ((10, None), (30, None), (60, 1), (100, 2)):  # 100 images, then 200
        module.images_seen += batch
        module.update_ema(batch)
        if halvings is not None:
            expected = g + (e0 - g) * 0.5**halvings
            torch.testing.assert_close(flat(module.generator_ema), expected, rtol=0, atol=1e-6)


def test_ramp_up_caps_the_half_life_early_in_training(tmp_path):
    """β = 0.5^(batch / min(half-life, ramp-up × images seen)), G moving between updates (EDM's ramp-up)."""
    module, _ = ema_module(tmp_path, half_life_kimg=1.0, rampup=0.5)
    ema = flat(module.generator_ema)
    gen = torch.Generator().manual_seed(0)
    for batch in (4, 4, 8, 100, 1000, 2000):
        g = flat(module.generator) + torch.randn(ema.shape, generator=gen, dtype=torch.float64) * 0.1
        set_flat(module.generator, g)
        module.images_seen += batch
        half_life = min(1000.0, 0.5 * module.images_seen)  # ramp-up until 2000 images, then 1 kimg
        beta = 0.5 ** (batch / half_life)
        ema = beta * ema + (1 - beta) * g
        module.update_ema(batch)
        torch.testing.assert_close(flat(module.generator_ema), ema, rtol=0, atol=1e-5)
    assert beta == pytest.approx(0.5**2)  # the last update ran at the full half-life


class SnapshotG(L.Callback):
    def __init__(self):
        self.g, self.images = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.g.append(flat(pl_module.generator))
        self.images.append(pl_module.images_seen)


def test_training_updates_the_ema_from_g_after_each_batch(tmp_path):
    """Three batches through the real step: the EMA is the hand recursion over G's weights after each G step."""
    module, datamodule = ema_module(tmp_path, half_life_kimg=0.01, rampup=0.5)
    ema = flat(module.generator_ema)
    spy = SnapshotG()
    trainer = one_batch_trainer(callbacks=[spy])
    trainer.fit_loop.epoch_loop.max_steps = 6  # three batches (two optimizer steps each)
    trainer.fit(module, datamodule=datamodule)
    assert spy.images == [4, 8, 12]
    for g, seen in zip(spy.g, spy.images, strict=True):
        beta = 0.5 ** (4 / min(10.0, 0.5 * seen))
        ema = beta * ema + (1 - beta) * g
    torch.testing.assert_close(flat(module.generator_ema), ema, rtol=0, atol=1e-6)
    assert (flat(module.generator_ema) - flat(module.generator)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# What reads the EMA: grids and evaluation during training (module.generate), the export, every loader
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run with the EMA on (4 batches, half-life 0.01 kimg, no ramp-up): its run directory."""
    out = tmp_path_factory.mktemp("ema_run")
    overrides = ["+experiment=smoke", "model.ema_half_life_kimg=0.01", "+model.ema_rampup=null"]
    train_in(compose_config(overrides, output_dir=out), out)
    return out


def checkpoint_state(run, prefix: str) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def assert_is_ema(state: dict[str, torch.Tensor], run) -> None:
    ema, g = checkpoint_state(run, "generator_ema."), checkpoint_state(run, "generator.")
    assert ema.keys() == g.keys() and set(ema) <= set(state)
    for key in ema:
        assert torch.equal(state[key], ema[key]), key
    assert any(not torch.equal(ema[k], g[k]) for k in ema), "the EMA should differ from G after training"


def test_the_export_holds_the_ema_weights(trained):
    state, _ = read_export(trained / "generator.safetensors")
    assert_is_ema({k: v for k, v in state.items() if not k.startswith("clip.")}, trained)


@pytest.mark.parametrize("what", ["checkpoints/last.ckpt", "generator.safetensors", "."])
def test_every_loader_gives_the_ema_weights(trained, what):
    assert_is_ema(load_generator(trained / what).state_dict(), trained)


def test_generate_samples_with_the_ema(tmp_path):
    """Sample grids and the periodic evaluation call module.generate: it runs the EMA, not G."""
    module, _ = ema_module(tmp_path, half_life_kimg=0.01, rampup=None)
    with torch.no_grad():
        for p in module.generator_ema.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # an EMA that differs from G, as after training
    noise = torch.randn(2, module.generator.nz)
    sent = module.clip.encode_text(module.clip.tokenize(["a red bird", "a blue car"]))
    images = module.generate(["a red bird", "a blue car"], noise)
    with torch.no_grad():
        torch.testing.assert_close(images, module.generator_ema.eval()(noise, sent).clamp(-1, 1))
        assert not torch.allclose(images, module.generator.eval()(noise, sent).clamp(-1, 1))


def test_evaluate_scores_the_ema(trained, monkeypatch):
    """galip.evaluate on a training checkpoint: the generator it scores holds the EMA weights."""
    monkeypatch.setattr(evaluate, "check_data", lambda cfg: None)
    monkeypatch.setattr(evaluate, "evaluators", lambda cfg: {})
    monkeypatch.setattr(evaluate, "subject", lambda cfg, sampler, *_: sampler)
    monkeypatch.setattr(evaluate, "report", lambda cfg, metrics, *_: metrics)
    monkeypatch.setattr(evaluate, "run_evaluators", lambda chosen, sampler: {"sampler": sampler})
    cfg = OmegaConf.create({"ckpt": str(trained / "checkpoints" / "last.ckpt"), "device": "cpu", "seed": 0})
    sampler = evaluate.evaluate(cfg)["sampler"]
    assert_is_ema(sampler.generator.state_dict(), trained)
