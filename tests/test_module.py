"""GALIPModule through a real Lightning Trainer: what trains, what stays frozen, what is logged and saved."""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import pytest
import torch

from galip.clip import taps as clip_taps
from galip.clip.taps import patch_tokens
from galip.module import GALIPModule
from tests.helpers import build, one_batch_trainer, smoke_cfg

LOGGED = ("d/real", "d/fake", "d/mismatch", "d/magp", "d/loss", "g/adv", "g/sim", "g/loss")
LOGGED += ("grad_norm/g", "grad_norm/d", "kimg")


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class Step:
    """Everything observed around one training batch of the smoke module at fp32."""

    module: GALIPModule
    trainer: L.Trainer
    before: dict[str, dict[str, torch.Tensor]]
    real_taps_requires_grad: list[bool] = field(default_factory=list)
    patch_embedding_grad: list[bool] = field(default_factory=list)
    patch_embedding_backward_calls: int = 0
    opt_param_ids: list[set[int]] = field(default_factory=list)


@pytest.fixture(scope="module")
def step(tmp_path_factory) -> Step:
    cfg = smoke_cfg(tmp_path_factory.mktemp("step"))
    module, datamodule = build(cfg)
    parts = {"clip": module.clip, "generator": module.generator, "discriminator": module.discriminator}
    result = Step(module, one_batch_trainer(), {name: snapshot(part) for name, part in parts.items()})

    original_real_taps = module.real_taps

    def spy_real_taps(image):
        taps = original_real_taps(image)
        result.real_taps_requires_grad.append(taps.requires_grad or taps.grad_fn is not None)
        return taps

    def count_backward(*_):
        result.patch_embedding_backward_calls += 1

    def spy_patch_tokens(conv, pixels):
        tokens = patch_tokens(conv, pixels)
        result.patch_embedding_grad.append(tokens.requires_grad)
        if tokens.requires_grad:
            tokens.register_hook(count_backward)
        return tokens

    module.real_taps = spy_real_taps
    clip_taps.patch_tokens = spy_patch_tokens
    try:
        result.trainer.fit(module, datamodule=datamodule)
    finally:
        clip_taps.patch_tokens = patch_tokens
        del module.real_taps
    result.opt_param_ids = [
        {id(p) for g in opt.param_groups for p in g["params"]} for opt in result.trainer.optimizers
    ]
    return result


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


# ---------------------------------------------------------------------------------------------
# One training batch
# ---------------------------------------------------------------------------------------------


def test_one_batch_ran(step):
    assert step.trainer.global_step == 2  # one D and one G optimizer step
    assert step.module.images_seen == 4


def test_step_trains_generator(step):
    moved = changed(step.before["generator"], step.module.generator)
    assert "decoder.to_rgb.weight" in moved
    assert "prompts.fc_prompt.weight" in moved  # the gradient comes back through the frozen CLIP mapper
    assert "bridge.conv_fuse.weight" in moved


def test_step_trains_discriminator(step):
    moved = changed(step.before["discriminator"], step.module.discriminator)
    assert "assessor.joint_conv.0.weight" in moved
    assert "extractor.main.gamma" in moved
    assert "extractor.blocks.0.beta" in moved


def test_step_leaves_clip_bit_identical(step):
    after = step.module.clip.state_dict()
    assert after.keys() == step.before["clip"].keys()
    for key, value in step.before["clip"].items():
        assert torch.equal(after[key], value), key


def test_no_gradient_reaches_clip(step):
    assert all(p.grad is None for p in step.module.clip.parameters())
    assert not any(p.requires_grad for p in step.module.clip.parameters())
    # every module that computes stays in eval mode through fit (the wrapper's own flag: see test_clip)
    assert not any(m.training for m in step.module.clip.model.modules())


def test_clip_absent_from_both_optimizers(step):
    clip_ids = {id(p) for p in step.module.clip.parameters()}
    opt_g, opt_d = step.opt_param_ids
    assert not clip_ids & opt_g and not clip_ids & opt_d
    assert opt_g == {id(p) for p in step.module.generator.parameters()}
    assert opt_d == {id(p) for p in step.module.discriminator.parameters()}


def test_optimizers_are_ttur_adam(step):
    opt_g, opt_d = step.trainer.optimizers
    assert isinstance(opt_g, torch.optim.Adam) and isinstance(opt_d, torch.optim.Adam)
    assert opt_g.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert opt_d.param_groups[0]["lr"] == pytest.approx(4e-4)
    assert tuple(opt_g.param_groups[0]["betas"]) == (0.0, 0.9)
    assert opt_g.param_groups[0]["fused"] and opt_d.param_groups[0]["fused"]


def test_logged_keys(step):
    metrics = step.trainer.callback_metrics
    missing = [k for k in LOGGED if k not in metrics]
    assert not missing, f"not logged: {missing}; logged: {sorted(metrics)}"
    assert all(torch.isfinite(metrics[k]) for k in LOGGED)
    assert metrics["kimg"].item() == pytest.approx(4 / 1000)
    d = {k: metrics[f"d/{k}"].item() for k in ("real", "fake", "mismatch", "magp", "loss")}
    assert d["loss"] == pytest.approx(d["real"] + 0.5 * (d["fake"] + d["mismatch"]) + d["magp"], rel=1e-5)
    g = {k: metrics[f"g/{k}"].item() for k in ("adv", "sim", "loss")}
    assert g["loss"] == pytest.approx(g["adv"] - 4.0 * g["sim"], rel=1e-5, abs=1e-6)
    assert metrics["grad_norm/g"] > 0 and metrics["grad_norm/d"] > 0


def test_real_taps_carry_no_graph(step):
    assert step.real_taps_requires_grad == [False]


def test_clip_backward_runs_only_for_the_fake(step):
    """The patch embedding runs twice per batch (fake with a graph, real without) and is back-propagated once
    (G step)."""
    assert sorted(step.patch_embedding_grad) == [False, True]
    assert step.patch_embedding_backward_calls == 1


# ---------------------------------------------------------------------------------------------
# Pieces without a Trainer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_module(tmp_path_factory) -> GALIPModule:
    module, _ = build(smoke_cfg(tmp_path_factory.mktemp("pieces")), seed=1)
    return module


def test_discriminator_terms_magp_in_fp32_under_bf16_autocast(smoke_module):
    m = smoke_module
    b, n, geo = 2, len(m.tap_blocks), m.clip.geometry
    real = torch.randn(b, n, geo.width, geo.grid, geo.grid)
    fake = torch.randn(b, n, geo.width, geo.grid, geo.grid)
    sent = torch.randn(b, geo.embed_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = m.discriminator_terms(real, fake, sent)
    assert terms["magp"].dtype == torch.float32 and terms["real"].dtype == torch.float32
    assert all(torch.isfinite(v) for v in terms.values())
    # the fp32 reference, computed outside autocast
    ref = m.discriminator_terms(real, fake, sent)
    torch.testing.assert_close(terms["magp"], ref["magp"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(terms["real"], ref["real"])


def test_sentence_vectors_prefer_cache(smoke_module):
    m = smoke_module
    cached = torch.randn(2, m.clip.geometry.embed_dim).double()
    tokens = m.clip.tokenize(["a", "b"])
    out = m.sentence_vectors({"sent_emb": cached, "tokens": tokens})
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cached.float())
    torch.testing.assert_close(m.sentence_vectors({"tokens": tokens}), m.clip.encode_text(tokens))


def test_parameter_counts_split_trainable_and_frozen(smoke_module):
    counts = smoke_module.parameter_counts()
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert counts["params/generator"] == n(smoke_module.generator)
    assert counts["params/discriminator"] == n(smoke_module.discriminator)
    assert counts["params/trainable"] == counts["params/generator"] + counts["params/discriminator"]
    assert counts["params/frozen"] == n(smoke_module.clip)


def test_generate_is_clamped_and_restores_train_mode(smoke_module):
    m = smoke_module
    m.generator.train()
    images = m.generate(["a red bird", "a blue car"], torch.randn(2, m.generator.nz) * 50)
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1
    assert m.generator.training


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------


def test_fp32_step_has_finite_losses(step):
    assert step.trainer.precision == "32-true"
    for key in LOGGED:
        assert torch.isfinite(step.trainer.callback_metrics[key]), key


@pytest.mark.parametrize("precision", ["bf16-mixed"])  # "32": the shared `step` fixture above
def test_precision_step_has_finite_losses(precision, tmp_path):
    module, datamodule = build(smoke_cfg(tmp_path))
    clip_before = snapshot(module.clip)
    trainer = one_batch_trainer(precision)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    for key in LOGGED:
        assert torch.isfinite(trainer.callback_metrics[key]), (precision, key)
    for key, value in clip_before.items():
        assert torch.equal(module.clip.state_dict()[key], value)


def test_fp16_autocast_with_grad_scaler_on_cpu(tmp_path):
    """The fp16 code path (GradScaler + MAGP in fp32) forced on CPU through Lightning's precision plugin (Lightning
    itself turns 16-mixed into bf16 on a CPU): both losses go through the scaler and both networks step."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    module, datamodule = build(smoke_cfg(tmp_path))
    before = {"generator": snapshot(module.generator), "discriminator": snapshot(module.discriminator)}
    scaled = []
    original_scale = scaler.scale
    scaler.scale = lambda loss: scaled.append(loss.detach().clone()) or original_scale(loss)
    trainer = one_batch_trainer(precision=None, plugins=[plugin])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.precision == "16-mixed" and len(scaled) == 2  # the D loss and the G loss, each scaled
    for key in ("d/real", "d/fake", "d/mismatch", "d/magp", "d/loss", "g/adv", "g/sim", "g/loss"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert torch.isfinite(trainer.callback_metrics["grad_norm/g"])
    # the scale stayed (no inf/NaN step skipped), so both optimizer steps ran on unscaled gradients
    assert scaler.get_scale() == 2.0**8
    assert "decoder.to_rgb.weight" in changed(before["generator"], module.generator)
    assert "assessor.joint_conv.0.weight" in changed(before["discriminator"], module.discriminator)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_checkpoint_has_no_clip_and_restores_g_and_d(step, tmp_path):
    path = tmp_path / "one_batch.ckpt"
    step.trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert not [k for k in keys if k.startswith("clip.")]
    assert any(k.startswith("generator.") for k in keys) and any(k.startswith("discriminator.") for k in keys)
    assert ckpt["images_seen"] == 4

    fresh, datamodule = build(smoke_cfg(tmp_path / "fresh"), seed=123)
    saved_g, saved_d = snapshot(step.module.generator), snapshot(step.module.discriminator)
    assert any(not torch.equal(v, saved_g[k]) for k, v in fresh.generator.state_dict().items())
    fresh_clip = snapshot(fresh.clip)

    # The Trainer's own restore path (strict loading); max_steps is already reached, so nothing trains.
    trainer = one_batch_trainer()
    trainer.fit(fresh, datamodule=datamodule, ckpt_path=path)
    assert trainer.global_step == 2 and fresh.images_seen == 4
    for key, value in fresh.generator.state_dict().items():
        assert torch.equal(value, saved_g[key]), key
    for key, value in fresh.discriminator.state_dict().items():
        assert torch.equal(value, saved_d[key]), key
    for key, value in fresh.clip.state_dict().items():  # CLIP comes from the config, not the file
        assert torch.equal(value, fresh_clip[key]), key


# ---------------------------------------------------------------------------------------------
# Built from config: factories for G and D, one place for the loss weights
# ---------------------------------------------------------------------------------------------
def test_module_builds_g_and_d_from_factories_around_its_clip(tiny_clip):
    import functools

    from galip.models import Discriminator, Generator

    module = GALIPModule(
        tiny_clip,
        functools.partial(Generator, ngf=8, prompt_blocks=[1]),
        functools.partial(Discriminator, out_ch=16, hidden=8),
        tap_blocks=[1, 3],
        loss={"sim_weight": 2.0},
    )
    assert (
        module.generator.clip is tiny_clip and module.discriminator.extractor.main.conv_r[0].in_channels == 64
    )
    assert len(module.discriminator.extractor.blocks) == 1  # n_taps - 1 gated blocks
    assert (module.sim_weight, module.magp_k, module.magp_p) == (2.0, 2.0, 6.0)
    with pytest.raises(ValueError, match="unknown keys \\['lambda'\\]"):
        GALIPModule(tiny_clip, module.generator, module.discriminator, loss={"lambda": 1.0})


def test_a_run_config_of_an_earlier_release_is_rebuilt(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    from galip.loading import build_module, upgraded

    cfg = smoke_cfg(tmp_path)
    old = cfg.model.copy()
    with open_dict(old):
        del old._target_
        old.hard_negatives = None
        old.generator.code_input = "noise"
        old.generator.fused_fusion = False
        del old.generator.execution
    new = upgraded(old)
    assert new._target_ == "galip.module.GALIPModule" and "hard_negatives" not in new
    assert OmegaConf.to_container(new.generator.execution) == {"fused_fusion": False}
    with open_dict(cfg):
        cfg.model = old
    module = build_module(cfg, instantiate(cfg.clip))
    assert not module.generator.execution.fused_fusion
    with open_dict(old):
        old.hard_negatives = {"_target_": "x"}
    with pytest.raises(ValueError, match="hard_negatives.*removed"):
        upgraded(old)
