"""Mate-G and Mate-D: parameter counts and shapes against docs/official_code.md#parameter-counts, init behaviour."""

from __future__ import annotations

import pytest
import torch

from galip.clip import FrozenCLIP
from galip.models import (
    BridgeFeaturePredictor,
    CLIPFeatureExtractor,
    Discriminator,
    Generator,
    ImageDecoder,
    PromptPredictor,
    QualityAssessor,
)
from galip.models.generator import decoder_channels, decoder_sizes
from galip.models.layers import Affine, DBlock, DFBlock, FusionBlock, GBlock
from tests.helpers import TINY_CLIP_CFG


def n_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def vitb32_generator(vitb32_clip) -> Generator:
    torch.manual_seed(0)
    return Generator(vitb32_clip)


@pytest.fixture(scope="module")
def vitb32_discriminator() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(width=768, grid=7, embed_dim=512, n_taps=3)


# ---------------------------------------------------------------------------------------------
# Parameter counts (docs/official_code.md#parameter-counts, ViT-B/32 geometry)
# ---------------------------------------------------------------------------------------------


def test_generator_trainable_count(vitb32_generator):
    assert n_trainable(vitb32_generator) == 51_830_211
    assert sum(p.numel() for p in vitb32_generator.parameters()) == 51_830_211  # nothing frozen inside G


def test_generator_counts_per_stage(vitb32_generator):
    g = vitb32_generator
    assert n_trainable(g.bridge.fc_code) == 316_736
    assert n_trainable(g.bridge.blocks) == 1_172_864  # official mapping.FBlocks
    assert n_trainable(g.bridge.conv_fuse) == 1_229_568
    assert n_trainable(g.decoder.stem) == 9_830_912  # official mapping.conv
    assert n_trainable(g.prompts) == 3_766_272  # official mapping.fc_prompt
    assert [n_trainable(b) for b in g.decoder.blocks] == [9_331_712] * 3 + [5_098_240, 1_746_304, 672_448]
    assert n_trainable(g.decoder.to_rgb) == 1_731


def test_discriminator_counts(vitb32_discriminator):
    d = vitb32_discriminator
    # Official NetD 28,706,821 minus the 2 × 590,592 dead conv_s weights of DBlocks 0-1 (never built here).
    assert n_trainable(d.extractor) == 27_525_637
    assert n_trainable(d.extractor.main) == 6_291_969
    assert [n_trainable(b) for b in d.extractor.blocks] == [11_207_426 - 590_592] * 2
    assert n_trainable(d.assessor) == 2_099_200


def test_generator_holds_no_clip_parameters(vitb32_generator, vitb32_clip):
    clip_ids = {id(p) for p in vitb32_clip.parameters()}
    assert not any(id(p) in clip_ids for p in vitb32_generator.parameters())
    assert not any("clip" in k for k in vitb32_generator.state_dict())
    assert not any(isinstance(m, FrozenCLIP) for m in vitb32_generator.modules())
    assert vitb32_generator.clip is vitb32_clip  # held by reference


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


def test_generator_output_vitb32(vitb32_generator):
    with torch.no_grad():
        out = vitb32_generator(torch.randn(1, 100), torch.randn(1, 512))
    assert out.shape == (1, 3, 224, 224)
    assert torch.isfinite(out).all()


def test_generator_output_tiny(tiny_clip):
    g = Generator(tiny_clip, ngf=16, code_ch=16, mid_ch=8, n_fusion_blocks=2, prompt_blocks=(1, 2))
    out = g(torch.randn(2, 100), torch.randn(2, 64))
    assert out.shape == (2, 3, 64, 64)
    out.mean().backward()
    assert all(p.grad is not None for p in g.parameters())
    assert all(p.grad is None for p in tiny_clip.parameters())


def test_generator_draws_its_own_size_and_a_smaller_clip_reads_it_with_gradients():
    """image_size=64 around a 32-px CLIP: one more decoder stage, 64-px images, and D's taps and the CLIP
    embedding of them (through FrozenCLIP.preprocess's resize) carry gradients back to G."""
    from galip.clip import load_clip

    cfg = {**TINY_CLIP_CFG, "vision_cfg": {**TINY_CLIP_CFG["vision_cfg"], "image_size": 32, "patch_size": 4}}
    torch.manual_seed(0)
    clip = load_clip(name=None, model_cfg=cfg)
    assert clip.geometry.image_size == 32 and clip.geometry.grid == 8
    kw = {"ngf": 16, "code_ch": 16, "mid_ch": 8, "n_fusion_blocks": 2, "prompt_blocks": (1, 2)}
    own, paper = Generator(clip, image_size=64, **kw), Generator(clip, **kw)
    assert (len(own.decoder.blocks), len(paper.decoder.blocks)) == (4, 3)
    assert own.config["image_size"] == 64 and paper.config["image_size"] is None
    out = own(torch.randn(2, 100), torch.randn(2, 64))
    assert out.shape == (2, 3, 64, 64)
    assert paper(torch.randn(2, 100), torch.randn(2, 64)).shape == (2, 3, 32, 32)
    taps, emb = clip.image_taps(out, [1, 3])
    assert taps.shape == (2, 2, 64, 8, 8)
    (taps.square().mean() + emb.square().mean()).backward()
    assert own.decoder.to_rgb.weight.grad.abs().sum() > 0


def test_cnn_generator_draws_its_own_size(tiny_clip):
    from galip.models.baseline import cnn_generator

    g = cnn_generator(tiny_clip, ngf=8, image_size=32, code_ch=16)  # a GALIP-only key is left behind
    assert g(torch.randn(2, 100), torch.randn(2, 64)).shape == (2, 3, 32, 32)
    assert g.config["image_size"] == 32


@pytest.mark.parametrize(
    ("grid", "size", "expected"),
    [(7, 224, [8, 16, 32, 64, 128, 224]), (8, 64, [8, 16, 32, 64]), (7, 256, [8, 16, 32, 64, 128, 256])],
)
def test_decoder_sizes(grid, size, expected):
    assert decoder_sizes(grid, size) == expected


def test_decoder_plan_vitb32_matches_official():
    dec = ImageDecoder(cond_dim=612, width=768, grid=7, image_size=224, ngf=64)
    assert [b.size for b in dec.blocks] == [8, 16, 32, 64, 128, 224]
    assert decoder_channels(64, 6) == [512, 512, 512, 512, 256, 128, 64]
    assert [isinstance(b.shortcut, torch.nn.Conv2d) for b in dec.blocks] == [False] * 3 + [True] * 3


def test_decoder_intermediate_shapes_vitb32():
    dec = ImageDecoder(cond_dim=612, width=768, grid=7, image_size=224, ngf=8)
    shapes = []
    handles = [
        b.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape))) for b in dec.blocks
    ]
    with torch.no_grad():
        out = dec(torch.randn(1, 768, 7, 7), torch.randn(1, 612))
    for h in handles:
        h.remove()
    assert [s[-1] for s in shapes] == [8, 16, 32, 64, 128, 224]
    assert [s[1] for s in shapes] == [64, 64, 64, 32, 16, 8]
    assert out.shape == (1, 3, 224, 224)


def test_bridge_and_prompt_shapes_vitb32(vitb32_generator):
    g = vitb32_generator
    z, s = torch.randn(2, 100), torch.randn(2, 512)
    cond = torch.cat([z, s], dim=1)
    with torch.no_grad():
        bridge = g.bridge(z, cond)
        prompts = g.prompts(cond)
    assert bridge.shape == (2, 768, 7, 7)
    assert prompts.shape == (2, 8, 768)
    assert g.prompt_blocks == (1, 2, 3, 4, 5, 6, 7, 8)
    # prompt k is the slice [k·768, (k+1)·768) of fc_prompt's output (official layout)
    flat = g.prompts.fc_prompt(cond)
    torch.testing.assert_close(prompts[:, 3], flat[:, 3 * 768 : 4 * 768])


def test_bridge_code_reads_noise_only():
    """fc_code is Linear(nz -> code_ch·grid²) on z alone; the text enters through the fusion blocks."""
    torch.manual_seed(0)
    bridge = BridgeFeaturePredictor(nz=10, cond_dim=74, grid=8, width=64, code_ch=16, mid_ch=8, n_blocks=2)
    assert (bridge.fc_code.in_features, bridge.fc_code.out_features) == (10, 16 * 64)
    z = torch.randn(2, 10)
    with torch.no_grad():
        out = bridge(z, torch.randn(2, 74))
        # Fusion affines are identity at init, so at init the bridge ignores the condition entirely.
        torch.testing.assert_close(bridge(z, torch.randn(2, 74)), out)
    assert out.shape == (2, 64, 8, 8)


def test_prompt_predictor_shape():
    assert PromptPredictor(cond_dim=20, n_prompts=3, width=16)(torch.randn(5, 20)).shape == (5, 3, 16)


@pytest.mark.parametrize("grid", [7, 8])
def test_quality_assessor_logits(grid):
    qa = QualityAssessor(in_ch=32, cond_dim=24, grid=grid, hidden=8)
    out = qa(torch.randn(3, 32, grid, grid), torch.randn(3, 24))
    assert out.shape == (3,)


def test_quality_assessor_vitb32_matches_official_netc(vitb32_discriminator):
    convs = [m for m in vitb32_discriminator.assessor.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(128, 1024, 4, 4), (1, 128, 4, 4)]
    assert all(c.bias is None for c in convs)


def test_discriminator_output_shape_vitb32(vitb32_discriminator):
    with torch.no_grad():
        out = vitb32_discriminator(torch.randn(2, 3, 768, 7, 7), torch.randn(2, 512))
    assert out.shape == (2,)


def test_generator_rejects_prompt_blocks_beyond_depth(tiny_clip):
    with pytest.raises(ValueError, match="prompt_blocks"):
        Generator(tiny_clip, prompt_blocks=(1, 4))


def test_generator_without_mapper_equals_zero_mapped_scale(tiny_clip):
    """Ablation "w/o CLIP in G" is the same network with the CLIP branch's contribution removed."""
    torch.manual_seed(0)
    kw = {"ngf": 16, "code_ch": 16, "mid_ch": 8, "n_fusion_blocks": 2, "prompt_blocks": (1, 2)}
    full = Generator(tiny_clip, mapped_scale=0.0, **kw)
    plain = Generator(tiny_clip, use_clip_mapper=False, **kw)
    assert plain.prompts is None and plain.prompt_blocks == ()
    missing, unexpected = plain.load_state_dict(full.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("prompts.") for k in unexpected)
    z, s = torch.randn(2, 100), torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(z, s), full(z, s))
        full.mapped_scale = 0.1
        assert not torch.allclose(plain(z, s), full(z, s))


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def test_affine_is_identity_at_init():
    affine = Affine(cond_dim=12, channels=6)
    x, y = torch.randn(3, 6, 5, 5), torch.randn(3, 12)
    torch.testing.assert_close(affine(x, y), x)
    with torch.no_grad():
        affine.fc_beta.linear2.bias.fill_(0.5)
    torch.testing.assert_close(affine(x, y), x + 0.5)


def test_dfblock_at_init_is_two_leaky_relus():
    block = DFBlock(cond_dim=12, channels=6)
    x, y = torch.randn(3, 6, 5, 5), torch.randn(3, 12)
    lrelu = torch.nn.functional.leaky_relu
    torch.testing.assert_close(block(x, y), lrelu(lrelu(x, 0.2), 0.2))


def test_fusion_and_gblock_shapes():
    y = torch.randn(2, 12)
    assert FusionBlock(16, 8, 16, 12)(torch.randn(2, 16, 7, 7), y).shape == (2, 16, 7, 7)
    up = GBlock(12, 16, 8, size=8)
    assert up(torch.randn(2, 16, 7, 7), y).shape == (2, 8, 8, 8)


def test_gblock_upsampling_is_legacy_nearest():
    """7 -> 8 with legacy nearest duplicates row/col 0 (docs/official_code.md#nearest-resizes): the shortcut path shows it."""
    block = GBlock(cond_dim=4, in_ch=2, out_ch=2, size=8)
    seen = []
    block.c1.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
    x = torch.arange(2 * 49, dtype=torch.float32).view(1, 2, 7, 7)
    with torch.no_grad():
        block(x, torch.zeros(1, 4))
    up = torch.nn.functional.interpolate(x, size=(8, 8), mode="nearest")
    torch.testing.assert_close(up[..., 0, :], up[..., 1, :])
    # fuse1 is identity+LReLU at init, so c1 sees lrelu(lrelu(up))
    lrelu = torch.nn.functional.leaky_relu
    torch.testing.assert_close(seen[0], lrelu(lrelu(up, 0.2), 0.2))


def test_dblock_gates_start_at_zero():
    block = DBlock(8, 8, takes_clip_feature=True)
    assert block.gamma.item() == 0 and block.beta.item() == 0
    x, feat = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x, feat), x)
    with torch.no_grad():
        block.beta.fill_(0.5)
    torch.testing.assert_close(block(x, feat), x + 0.5 * feat)


def test_feature_extractor_at_init_is_main_conv_s_of_first_tap():
    """docs/official_code.md#discriminator-netd-and-netc: at init all γ, β are 0, so D(h) = conv_s of main applied to h[:, 0]."""
    torch.manual_seed(0)
    fe = CLIPFeatureExtractor(width=32, n_taps=3, out_ch=16)
    taps = torch.randn(2, 3, 32, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(fe(taps), fe.main.conv_s(taps[:, 0]))
        altered = taps.clone()
        altered[:, 1:] = torch.randn_like(altered[:, 1:])
        torch.testing.assert_close(fe(altered), fe(taps))  # later taps gated off at init
        fe.blocks[0].beta.fill_(1.0)
        assert not torch.allclose(fe(altered), fe(taps))


def test_discriminator_at_init_on_vitb32_taps(vitb32_discriminator):
    d = vitb32_discriminator
    taps, s = torch.randn(2, 3, 768, 7, 7), torch.randn(2, 512)
    with torch.no_grad():
        torch.testing.assert_close(d(taps, s), d.assessor(d.extractor.main.conv_s(taps[:, 0]), s))


# ---------------------------------------------------------------------------------------------
# One execution setting; options of earlier releases
# ---------------------------------------------------------------------------------------------
def test_execution_setting_names_and_levers():
    from dataclasses import asdict

    from galip.models.generator import Execution

    fields = list(asdict(Execution()))
    assert "image_block_channels_last" in fields and "rgb_channels_last" in fields
    assert Execution.of("fast") == Execution(**dict.fromkeys(fields, True))
    assert Execution.of("official") == Execution(**dict.fromkeys(fields, False))
    assert Execution.of({"fused_fusion": False}) == Execution(fused_fusion=False)
    with pytest.raises(ValueError, match="'fast', 'official'"):
        Execution.of("quick")


def test_generator_applies_its_execution_to_every_block(tiny_clip):
    g = Generator(tiny_clip, ngf=8, prompt_blocks=[1], execution={"folded_upsample": False})
    assert all(m.fused for m in g.modules() if isinstance(m, DFBlock))
    assert not any(m.folded for m in g.modules() if isinstance(m, GBlock))
    assert "execution" not in g.config


def test_removed_generator_options_say_what_replaced_them(tiny_clip):
    with pytest.raises(TypeError, match=r"execution: 'fast' \| 'official'"):
        Generator(tiny_clip, ngf=8, prompt_blocks=[1], batched_affines=False)
    with pytest.raises(TypeError, match="code_input='condition' was removed"):
        Generator(tiny_clip, ngf=8, prompt_blocks=[1], code_input="condition")
    with pytest.raises(TypeError, match="unexpected arguments"):
        Generator(tiny_clip, ngf=8, prompt_blocks=[1], colour="red")
    Generator(tiny_clip, ngf=8, prompt_blocks=[1], code_input="noise")  # exports of earlier releases say so
