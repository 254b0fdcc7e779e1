"""GALIPModule through a real Lightning Trainer: what trains, what stays frozen, what is logged and saved."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field

import lightning as L
import pytest
import torch

from galip.module import GALIPModule
from galip.world.scenes import shape_swap, shape_swaps
from tests.helpers import build, compose_config, one_batch_trainer, smoke_cfg

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
    conv1_forward_grad: list[bool] = field(default_factory=list)
    conv1_backward_calls: int = 0
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
        result.conv1_backward_calls += 1

    module.real_taps = spy_real_taps
    conv1 = module.clip.visual.conv1
    handles = [
        conv1.register_forward_hook(lambda _m, _i, out: result.conv1_forward_grad.append(out.requires_grad)),
        conv1.register_full_backward_hook(count_backward),
    ]
    try:
        result.trainer.fit(module, datamodule=datamodule)
    finally:
        for h in handles:
            h.remove()
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
    """conv1 runs twice per batch (fake with a graph, real without) and is back-propagated once (G step)."""
    assert sorted(step.conv1_forward_grad) == [False, True]
    assert step.conv1_backward_calls == 1


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


def test_fp16_mixed_on_cpu():
    """Lightning does not run fp16 AMP on CPU: it falls back to bf16-mixed with a warning (no exception)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer = one_batch_trainer("16-mixed")
        except Exception as err:  # a future Lightning may refuse outright
            pytest.skip(f"fp16 AMP refused on CPU: {err}")
    if trainer.precision != "16-mixed":
        reason = next((str(w.message) for w in caught if "16-mixed" in str(w.message)), trainer.precision)
        pytest.skip(f"fp16 AMP not available on CPU: {reason}")
    pytest.fail("Lightning accepted 16-mixed on CPU: run a step here like the bf16 test")  # pragma: no cover


@pytest.mark.slow
def test_fp16_autocast_with_grad_scaler_on_cpu(tmp_path):
    """The fp16 code path (GradScaler + MAGP in fp32) forced on CPU through Lightning's precision plugin."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    try:
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    except Exception as err:
        pytest.skip(f"fp16 GradScaler on CPU refused: {err}")
    module, datamodule = build(smoke_cfg(tmp_path))
    trainer = one_batch_trainer(precision=None, plugins=[plugin])
    trainer.fit(module, datamodule=datamodule)
    for key in ("d/real", "d/fake", "d/mismatch", "d/magp", "d/loss", "g/adv", "g/sim", "g/loss"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert torch.isfinite(trainer.callback_metrics["grad_norm/g"])


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
# Hard negatives (model.hard_negatives): extra mismatched pairs for D
# ---------------------------------------------------------------------------------------------


def test_hard_negatives_join_the_mismatch_term(smoke_module):
    m = smoke_module
    b, n, geo = 3, len(m.tap_blocks), m.clip.geometry
    torch.manual_seed(0)
    real = torch.randn(b, n, geo.width, geo.grid, geo.grid)
    fake = torch.randn(b, n, geo.width, geo.grid, geo.grid)
    sent = torch.randn(b, geo.embed_dim)
    rows, hard_sent = torch.tensor([0, 2]), torch.randn(2, geo.embed_dim)
    plain = m.discriminator_terms(real, fake, sent)
    terms = m.discriminator_terms(real, fake, sent, (rows, hard_sent))
    with torch.no_grad():  # by hand: hinge over the b rolled pairs and the 2 hard pairs, one mean
        rolled = m.discriminator(real, torch.roll(sent, -1, 0)).flatten()
        hard = m.discriminator(real[rows], hard_sent).flatten()
        expected = torch.relu(1 + torch.cat([rolled, hard])).mean()
    torch.testing.assert_close(terms["mismatch"], expected)
    assert not torch.allclose(terms["mismatch"], plain["mismatch"])
    for key in ("real", "fake", "magp"):
        torch.testing.assert_close(terms[key], plain[key])
    torch.testing.assert_close(
        terms["loss"], terms["real"] + 0.5 * (terms["fake"] + terms["mismatch"]) + terms["magp"]
    )


def test_hard_negative_vectors_encode_the_swapped_captions_of_rows_that_have_one(smoke_module):
    m = smoke_module
    captions = ["a red circle", "no shape here", "a blue square"]
    m.hard_negatives = shape_swap
    try:
        rows, vectors = m.hard_negative_vectors({"caption": captions})
        assert rows.tolist() == [0, 2]
        assert vectors.shape == (2, m.clip.geometry.embed_dim) and not vectors.requires_grad
        # each vector is the text tower's embedding of one shape swap of that row's caption (one shape word
        # per caption here, so shape_swaps lists all three candidates whatever the RNG)
        for row, vector in zip(rows.tolist(), vectors, strict=True):
            embedded = m.clip.encode_text(m.clip.tokenize(shape_swaps(captions[row], random.Random(0))))
            assert torch.isclose(embedded, vector[None], atol=1e-5).all(dim=1).any()
        with pytest.raises(KeyError, match="caption"):
            m.hard_negative_vectors({"tokens": torch.zeros(1, 77, dtype=torch.long)})
    finally:
        m.hard_negatives = None
    assert m.hard_negative_vectors({"caption": captions}) is None


def test_step_with_hard_negatives_from_config(tmp_path):
    cfg = compose_config(
        [
            "+experiment=smoke",
            "data=shapes",  # captions with shape words, rendered in memory
            "data.shards=null",
            "data.n_train=8",
            "data.n_val=4",
            "data.batch_size=4",
            "data.num_workers=0",
            "+model.hard_negatives._target_=galip.world.scenes.shape_swap",
            "+model.hard_negatives._partial_=true",
        ],
        output_dir=tmp_path,
    )
    module, datamodule = build(cfg)
    assert module.hard_negatives.func is shape_swap
    found: list = []
    original = module.hard_negative_vectors
    module.hard_negative_vectors = lambda batch: found.append(original(batch)) or found[-1]
    trainer = one_batch_trainer()
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2 and len(found) == 1
    rows, vectors = found[0]
    assert rows.tolist() == [0, 1, 2, 3] and vectors.shape[0] == 4  # every scene names a shape
    assert torch.isfinite(trainer.callback_metrics["d/mismatch"])


# ---------------------------------------------------------------------------------------------
# D's embedding head (model.discriminator.embedding_head): D also reads CLIP's pooled embedding
# ---------------------------------------------------------------------------------------------


def headed_cfg(output_dir, *extra: str):
    return compose_config(
        ["+experiment=smoke", "+model.discriminator.embedding_head=true", *extra], output_dir
    )


def test_embedding_head_terms_by_hand(tmp_path):
    module, _ = build(headed_cfg(tmp_path), seed=2)
    d = module.discriminator
    assert module.discriminator_reads_embedding
    with torch.no_grad():
        for p in d.embedding_head.parameters():  # a head that is not zero, so it shows in every term
            p.copy_(torch.randn_like(p) * 0.3)
    b, n, geo = 3, len(module.tap_blocks), module.clip.geometry
    real, fake = (
        torch.randn(b, n, geo.width, geo.grid, geo.grid),
        torch.randn(b, n, geo.width, geo.grid, geo.grid),
    )
    sent, real_emb, fake_emb = (
        torch.randn(b, geo.embed_dim),
        torch.randn(b, geo.embed_dim),
        torch.randn(b, geo.embed_dim),
    )
    rows, hard_sent = torch.tensor([1]), torch.randn(1, geo.embed_dim)
    terms = module.discriminator_terms(real, fake, sent, (rows, hard_sent), (real_emb, fake_emb))

    x, s, e = (t.clone().requires_grad_(True) for t in (real, sent, real_emb))
    d_real = d(x, s, e)
    grads = torch.autograd.grad(d_real.sum(), (x, s, e))
    norms = torch.cat([g.flatten(1) for g in grads], 1).norm(dim=1)
    with torch.no_grad():
        mis = torch.cat(
            [d(real, torch.roll(sent, -1, 0), real_emb), d(real[rows], hard_sent, real_emb[rows])]
        )
        torch.testing.assert_close(terms["real"], torch.relu(1 - d_real).mean())
        torch.testing.assert_close(terms["fake"], torch.relu(1 + d(fake, sent, fake_emb)).mean())
        torch.testing.assert_close(terms["mismatch"], torch.relu(1 + mis).mean())
        torch.testing.assert_close(terms["magp"], module.magp_k * norms.pow(module.magp_p).mean())
    # MAGP sees the embedding: without its gradient the penalty is a different number
    without_e = torch.cat([g.flatten(1) for g in grads[:2]], 1).norm(dim=1)
    assert not torch.allclose(terms["magp"], module.magp_k * without_e.pow(module.magp_p).mean())


def test_step_with_embedding_head_trains_the_head_and_feeds_it_clip_embeddings(tmp_path):
    module, datamodule = build(headed_cfg(tmp_path), seed=3)
    before = snapshot(module.discriminator)
    seen: list = []
    original = module.d_input.real_with_embedding
    module.d_input.real_with_embedding = lambda image: seen.append(original(image)) or seen[-1]
    trainer = one_batch_trainer()
    trainer.fit(module, datamodule=datamodule)
    taps, embedding = seen[0]
    assert embedding.shape == (taps.shape[0], module.clip.geometry.embed_dim) and embedding.grad_fn is None
    # the head's last layer starts at zero, so the first step moves it (and only it: h = 0 blocks the rest)
    head_changed = {k for k in changed(before, module.discriminator) if k.startswith("embedding_head.")}
    assert head_changed == {"embedding_head.net.2.weight", "embedding_head.net.2.bias"}
    assert torch.isfinite(trainer.callback_metrics["d/magp"])


def test_probe_score_of_a_headed_d_uses_the_real_embedding(tmp_path):
    from galip.world.probe import discriminator_score

    module, _ = build(headed_cfg(tmp_path), seed=4)
    with torch.no_grad():
        for p in module.discriminator.embedding_head.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    size = module.clip.geometry.image_size
    image, captions = torch.rand(1, 3, size, size) * 2 - 1, ["a red circle", "a blue square"]
    with torch.no_grad():
        scores = discriminator_score(module)(image, captions)
        taps, embedding = module.d_input.real_with_embedding(image)
        sent = module.clip.encode_text(module.clip.tokenize(captions))
        expected = module.discriminator(taps.expand(2, *taps.shape[1:]), sent, embedding.expand(2, -1))
        without_head = module.discriminator.assessor(
            module.discriminator.features(taps.expand(2, *taps.shape[1:])), sent
        )
    torch.testing.assert_close(scores, expected)
    assert not torch.allclose(scores, without_head)
