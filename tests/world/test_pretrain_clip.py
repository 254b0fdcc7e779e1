"""The shapes world's own CLIP: retrieval maths, learning beyond chance, a checkpoint load_clip reads back
exactly, and a cache that finds an artefact again and keys it by config."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import galip.world.tiny_clip as pc
from galip.clip import load_clip
from galip.data import Tokenized, collate
from galip.world.cache import SHIPPED_ROOT
from galip.world.scenes import ShapesWorld
from tests.helpers import TINY_CLIP_CFG, compose_config

# A short run: ~40 s on a quiet 2-core CPU. Retrieval among B=32 val pairs; chance is 1/32.
B = 32
SHORT = [
    "optim.steps=40",
    "optim.warmup_steps=5",
    "optim.lr=2e-3",
    f"data.batch_size={B}",
    "data.n_val=128",
    "data.num_workers=0",
    f"eval.retrieval_batch={B}",
    "status_every=0",
]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Train once through `ensure_shapes_clip` with a spy on `pretrain` that keeps the trained module."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("GALIP_CACHE", str(cache))
    trained = {}
    real = pc.pretrain

    def spy(cfg):
        trained["module"], metrics = real(cfg)
        return trained["module"], metrics

    mp.setattr(pc, "pretrain", spy)
    try:
        path = pc.ensure_shapes_clip(SHORT)
    finally:
        mp.undo()
    return path, trained["module"], cache


# ---------------------------------------------------------------------------------------------------------
# Retrieval metric
# ---------------------------------------------------------------------------------------------------------
def test_retrieval_is_perfect_for_matching_features_and_chance_for_constant_ones():
    feats = torch.nn.functional.normalize(torch.randn(128, 16), dim=-1)
    scene = torch.arange(128)
    perfect = pc.retrieval_top1(feats, feats, scene, 64)
    assert perfect["i2t_top1"] == perfect["t2i_top1"] == perfect["i2t_top1_strict"] == 1.0
    assert perfect["chance"] == 1 / 64 and perfect["n_pairs"] == 128
    constant = pc.retrieval_top1(feats, torch.ones(128, 16), scene, 64)  # every caption scores the same
    assert constant["i2t_top1"] == pytest.approx(1 / 64)


def test_retrieval_counts_a_twin_scene_as_a_hit_only_outside_strict_mode():
    feats = torch.eye(4)
    text = feats[[1, 0, 2, 3]]  # images 0 and 1 retrieve each other's caption
    same_scene = torch.tensor([7, 7, 8, 9])  # ... which describe the same scene
    r = pc.retrieval_top1(feats, text, same_scene, 4)
    assert r["i2t_top1"] == 1.0 and r["i2t_top1_strict"] == 0.5
    with pytest.raises(ValueError, match="at least 8"):
        pc.retrieval_top1(feats, text, same_scene, 8)


def test_scene_ids_are_equal_exactly_for_identical_scenes():
    world = Tokenized(ShapesWorld(0, "val", 64, image_size=16), lambda c: torch.zeros(len(c), 77))
    batch = collate([world[i] for i in range(64)])
    rows = pc.scene_ids(batch)
    specs = [world.dataset.scene(i)[0].spec() for i in range(64)]
    for i in range(64):
        for j in range(64):
            assert torch.equal(rows[i], rows[j]) == (specs[i] == specs[j])


# ---------------------------------------------------------------------------------------------------------
# Config and cache keys (no training)
# ---------------------------------------------------------------------------------------------------------
def test_config_uses_the_tiny_clip_architecture_and_both_experiment_spellings(tmp_path, monkeypatch):
    monkeypatch.setenv("GALIP_CACHE", str(tmp_path))
    plain, plus = (
        pc.compose_config(["experiment=shapes_clip"]),
        pc.compose_config(["+experiment=shapes_clip"]),
    )
    assert plain == plus == pc.compose_config()  # shapes_clip is the default experiment
    assert pc.architecture(plain) == TINY_CLIP_CFG  # one architecture file, not a copy
    assert plain.paths.cache_dir == str(tmp_path)
    assert plain.data.image_size == TINY_CLIP_CFG["vision_cfg"]["image_size"]


def test_composing_inside_another_hydra_job_keeps_that_jobs_name():
    # A multirun's jobs name their log file after JobRuntime's name; composing the pretraining config from
    # inside job 0 (the demo's resolver does) must not rename jobs 1.. to "pretrain_clip".
    from hydra.core.utils import JobRuntime

    runtime = JobRuntime.instance()
    before = runtime.conf.get("name")
    runtime.set("name", "train")
    try:
        pc.compose_config()
        assert runtime.get("name") == "train"
    finally:
        runtime.set("name", before)


def test_artefact_key_follows_what_determines_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("GALIP_CACHE", str(tmp_path))
    monkeypatch.setenv("GALIP_NO_SHIPPED", "1")

    def directory(*overrides):
        cfg = pc.compose_config(list(overrides))
        return pc.artefact_dir("clip", pc.artefact_config(cfg), root=cfg.paths.cache_dir)

    base = directory()
    assert base.parent == tmp_path / "clip"
    assert directory() == base
    assert directory("data.num_workers=0", "status_every=1", "eval.retrieval_batch=32") == base
    for changed in (
        "optim.lr=1e-4",
        "optim.steps=7",
        "seed=5",
        "data.batch_size=16",
        "clip.model_cfg.embed_dim=32",
        "loss.shape_negatives_weight=0.5",
        "loss.shape_negatives_weight=0",
    ):
        assert directory(changed) != base, changed
    # An unused hard-negative term is left out of the key, so keys made before it existed still hold: the
    # plain 400-step setting is the CLIP shipped until 2026-12-01.
    assert directory("loss.shape_negatives_weight=0", "optim.steps=400").name == "5f3d85231b27"


def test_the_demo_clip_pretrains_on_the_demo_world_and_is_keyed_by_it(tmp_path, monkeypatch):
    """+experiment=shapes_demo_clip: the shapes_clip recipe on data=shapes_demo's world at 32 px with 4-pixel
    patches; its key names that world (the full world's keys name none) and its shape negatives use its shapes."""
    from galip.world.scenes import World

    monkeypatch.setenv("GALIP_CACHE", str(tmp_path))
    monkeypatch.setenv("GALIP_NO_SHIPPED", "1")
    demo, full = pc.compose_config(["experiment=shapes_demo_clip"]), pc.compose_config()
    world = World.from_config(compose_config(["data=shapes_demo"]).data.world)
    assert World.from_config(demo.data.world) == world and full.data.world is None
    vision = pc.architecture(demo)["vision_cfg"]
    assert (demo.data.image_size, vision["image_size"], vision["patch_size"]) == (32, 32, 4)
    assert demo.loss == full.loss and demo.optim == full.optim  # the recipe is shapes_clip's
    key, full_key = pc.artefact_config(demo), pc.artefact_config(full)
    assert key["data"]["world"] == world.key() and "world" not in full_key["data"]
    assert pc.artefact_dir("clip", key, root=tmp_path) != pc.artefact_dir("clip", full_key, root=tmp_path)
    moved = pc.compose_config(["experiment=shapes_demo_clip", "data.world.jitter=0"])
    assert pc.artefact_config(moved)["data"]["world"] == replace(world, jitter=0).key()
    module = pc.build_module(demo)
    assert tuple(module.hparams.shapes) == world.shapes
    assert pc.build_module(full).hparams.shapes == ("circle", "square", "triangle", "diamond")
    negatives = []
    monkeypatch.setattr(
        module, "caption_negatives_loss", lambda out, n: negatives.append(n) or torch.zeros(())
    )
    caption = "a large red cross on a white background"
    module.shape_negatives_loss({"caption": [caption]}, {}, batch_idx=0)
    assert sorted(negatives[0][0]) == sorted(
        caption.replace("cross", s) for s in world.shapes if s != "cross"
    )


def test_the_demo_setting_is_the_shipped_artefact_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("GALIP_CACHE", str(tmp_path))
    path = pc.ensure_shapes_clip()  # found, not trained: the shipped copy has the demo config's key
    assert path.parent.parent == SHIPPED_ROOT / "clip", "shapes_clip.yaml no longer matches the shipped CLIP"
    metrics = json.loads((path.parent / "metrics.json").read_text())
    assert metrics["retrieval_batch"] == 64 and metrics["i2t_top1"] > 0.5
    frozen = load_clip(name=None, model_cfg=TINY_CLIP_CFG, path=path)
    assert frozen.geometry.embed_dim == TINY_CLIP_CFG["embed_dim"]


def test_pretraining_shows_a_smaller_clip_what_frozen_clip_preprocess_shows_it():
    """A 32-px CLIP pretrained on the 64-px world: its input is FrozenCLIP.preprocess's, resize included
    (checked against an antialiased bilinear resize done here); a constant image stays that constant."""
    from galip.clip import FrozenCLIP

    cfg = {**TINY_CLIP_CFG, "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], "image_size": 32, "patch_size": 4}}
    module = pc.ContrastiveCLIP(cfg)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    mine = module.pixels(image)
    assert mine.shape == (2, 3, 32, 32)
    assert torch.allclose(mine, FrozenCLIP(module.model).preprocess(image), atol=1e-6)
    by_hand = F.interpolate((image + 1) * 0.5, size=(32, 32), mode="bilinear", antialias=True)
    assert torch.allclose(mine, (by_hand - module.mean) / module.std, atol=1e-6)
    grey = module.pixels(torch.full((1, 3, 64, 64), 0.5))
    assert torch.allclose(grey, (torch.full((1, 3, 1, 1), 0.75) - module.mean) / module.std, atol=1e-6)


def test_retraining_goes_to_the_cache_never_over_a_shipped_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("GALIP_CACHE", str(tmp_path))
    shipped = pc.ensure_shapes_clip()
    before = shipped.stat().st_mtime_ns
    fake = (pc.ContrastiveCLIP(TINY_CLIP_CFG), {"i2t_top1": 0.0, "retrieval_batch": 64})
    monkeypatch.setattr(pc, "pretrain", lambda cfg: fake)
    monkeypatch.setattr(pc, "report", lambda path, verb: None)
    path = pc.ensure_shapes_clip(["cache.force=true"])
    assert path == tmp_path / "clip" / shipped.parent.name / "clip.pt" and path.is_file()
    assert shipped.stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------------------------
# A short pretraining (one run shared by the tests below)
# ---------------------------------------------------------------------------------------------------------
def test_short_pretraining_beats_chance(short_run):
    path, _, _ = short_run
    metrics = json.loads((path.parent / "metrics.json").read_text())
    assert metrics["retrieval_batch"] == B and metrics["n_pairs"] == 128 and metrics["steps"] == 40
    assert metrics["i2t_top1"] > 2 / B, metrics
    assert metrics["t2i_top1"] > 2 / B, metrics


def test_checkpoint_loads_through_load_clip_with_the_trained_embeddings(short_run):
    path, module, _ = short_run
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert "logit_scale" in state and not any(k.startswith(("model.", "module.")) for k in state)

    frozen = load_clip(name=None, model_cfg=TINY_CLIP_CFG, path=path)
    assert all(p.dtype == torch.float32 for p in frozen.parameters())
    world = ShapesWorld(3, "test", 8, image_size=64)
    batch = collate([Tokenized(world, frozen.tokenize)[i] for i in range(8)])
    module.eval()
    with torch.no_grad():
        text = module.model.encode_text(batch["tokens"])
        image = module.model.encode_image(module.pixels(batch["image"]))
        _, frozen_image = frozen.image_taps(batch["image"], [0])
    # FrozenCLIP's text pass reads the captions' tokens only, with oneDNN's GEMMs: summation order differs
    torch.testing.assert_close(frozen.encode_text(batch["tokens"]), text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen_image, image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen.tokenize(batch["caption"]), batch["tokens"])


def test_second_call_finds_the_artefact_without_training(short_run, monkeypatch):
    path, _, cache = short_run
    monkeypatch.setenv("GALIP_CACHE", str(cache))
    mtime = path.stat().st_mtime_ns

    def no_training(cfg):
        raise AssertionError("the cached artefact should have been found")

    monkeypatch.setattr(pc, "pretrain", no_training)
    assert pc.ensure_shapes_clip(SHORT) == path
    assert path.stat().st_mtime_ns == mtime
    assert json.loads((path.parent / "config.json").read_text())["optim"]["steps"] == 40
    with pytest.raises(AssertionError, match="cached artefact"):  # a changed config is a different artefact
        pc.ensure_shapes_clip([*SHORT, "optim.lr=1e-3"])


# ---------------------------------------------------------------------------------------------------------
# Hard negatives: the caption with one shape swapped
# ---------------------------------------------------------------------------------------------------------
def test_shape_swaps_change_exactly_one_shape_word_to_each_other_shape():

    from galip.world.scenes import SHAPES

    caption = "a small red circle on the left and a large blue square at the top, on a grey background"
    swaps = pc.shape_swaps(caption, random.Random(0))
    assert len(swaps) == len(SHAPES) - 1 and caption not in swaps and len(set(swaps)) == len(swaps)
    for swap in swaps:
        changed = [(a, b) for a, b in zip(caption.split(), swap.split(), strict=True) if a != b]
        assert len(changed) == 1 and changed[0][0] in SHAPES and changed[0][1] in SHAPES
    assert pc.shape_swaps("a red thing", random.Random(0)) == []


def test_clip_probe_scores_a_clip_that_only_sees_circles():
    """A stand-in CLIP whose image embedding matches exactly the captions that mention a circle: the shape
    probe then succeeds on the probed objects that are circles, and colour never wins (ties go to index 0)."""
    from galip.world.probe import attribute_probe
    from galip.world.scenes import COLOUR_NAMES, ShapesWorld

    class CircleCLIP:
        geometry = type("G", (), {"image_size": 16})()

        def image_taps(self, image, blocks):
            return None, torch.tensor([[1.0, 0.0]])

        def tokenize(self, captions):
            return list(captions)

        def encode_text(self, captions):
            return torch.tensor([[1.0, 0.0] if "circle" in c else [0.0, 1.0] for c in captions])

    n = 24
    world = ShapesWorld(seed=0, split="val", length=n, image_size=16)
    probed = [world.scene(i)[0].objects[i % len(world.scene(i)[0].objects)] for i in range(n)]
    result = attribute_probe(CircleCLIP(), n_scenes=n)
    assert result["shape"] == sum(o.shape == "circle" for o in probed) / n
    assert 0 < result["shape"] < 1
    assert result["colour"] == sum(COLOUR_NAMES.index(o.colour) == 0 for o in probed) / n
    # position: every candidate scores the same, so the first free place wins
    firsts = [_first_free_place(world.scene(i)[0], i) for i in range(n)]
    assert result["position"] == sum(f == o.position for f, o in zip(firsts, probed, strict=True)) / n


def _first_free_place(scene, i):
    from galip.world.scenes import POSITION_NAMES

    k = i % len(scene.objects)
    taken = {o.position for j, o in enumerate(scene.objects) if j != k}
    return next(p for p in POSITION_NAMES if p not in taken)


def test_caption_negatives_loss_masks_missing_negatives_by_hand():
    """Images with different numbers of negatives: each row's CE over [own, its own negatives] only."""
    from galip.world.scenes import ShapesWorld

    torch.manual_seed(0)
    module = pc.build_module(pc.compose_config([]))
    world = ShapesWorld(seed=0, split="train", length=3, image_size=64)
    items = [world[i] for i in range(3)]
    out = module(
        torch.stack([it["image"] for it in items]), module.tokenizer([it["caption"] for it in items])
    )
    negatives = [["a red circle", "a blue square"], [], ["a green diamond on the left"]]
    loss = module.caption_negatives_loss(out, negatives)
    scale, img = out["logit_scale"], out["image_features"]
    expected = []
    for i in (0, 2):
        text = F.normalize(module.model.encode_text(module.tokenizer(negatives[i])), dim=-1)
        logits = scale * torch.cat([(img[i] * out["text_features"][i]).sum()[None], text @ img[i]])
        expected.append(-torch.log_softmax(logits, 0)[0])
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    loss.backward()  # the masked slots must not poison the learnable temperature (0 * inf = NaN)
    assert torch.isfinite(module.model.logit_scale.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert module.caption_negatives_loss(out, [[], [], []]).item() == 0.0


def test_shape_negatives_loss_trains_both_towers():
    from galip.world.scenes import ShapesWorld

    torch.manual_seed(0)
    cfg = pc.compose_config(["loss.shape_negatives_weight=1.0"])
    module = pc.build_module(cfg)
    assert module.hparams.shape_negatives_weight == 1.0
    world = ShapesWorld(seed=0, split="train", length=4, image_size=64)
    items = [world[i] for i in range(4)]
    batch = {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}
    out = module(batch["image"], module.tokenizer(batch["caption"]))
    loss = module.shape_negatives_loss(batch, out, batch_idx=0)
    # Four candidates per image (own caption + three swaps): near ln 4 for an untrained CLIP.
    assert loss.ndim == 0 and torch.isfinite(loss) and abs(loss.item() - math.log(4)) < 0.5
    loss.backward()
    visual = next(p for n, p in module.model.named_parameters() if n.startswith("visual."))
    text = module.model.token_embedding.weight
    assert visual.grad is not None and visual.grad.abs().sum() > 0
    assert text.grad is not None and text.grad.abs().sum() > 0


def test_probe_ranks_captions_by_any_score_and_checks_image_count():
    from galip.world.probe import attribute_probe, val_captions

    class Geometry:
        geometry = type("G", (), {"image_size": 16})()

    n = 12
    captions = val_captions(n)

    def oracle(image, candidates):  # knows scene i's true caption: the probe must count every scene
        return torch.tensor([float(c in captions) for c in candidates])

    assert attribute_probe(Geometry(), n_scenes=n, score=oracle) == {
        "shape": 1.0,
        "colour": 1.0,
        "size": 1.0,
        "position": 1.0,
    }
    with pytest.raises(ValueError, match="3 images for 12 scenes"):
        attribute_probe(Geometry(), n_scenes=n, images=torch.zeros(3, 3, 16, 16), score=oracle)


def test_probe_cli_builds_a_checkpoint_with_the_architecture_written_beside_it(tmp_path):
    import copy

    from galip.world.artefacts import load_shapes_clip

    cfg = copy.deepcopy(TINY_CLIP_CFG)
    cfg["vision_cfg"]["patch_size"] = 4
    torch.manual_seed(0)
    source = load_clip(name=None, model_cfg=cfg)
    torch.save(source.model.state_dict(), tmp_path / "clip.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model_cfg": cfg}))
    loaded = load_shapes_clip(str(tmp_path / "clip.pt"))
    assert loaded.geometry.grid == 16
    assert torch.equal(loaded.visual.conv1.weight, source.visual.conv1.weight)
