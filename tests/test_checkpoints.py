"""Generator exports (safetensors) and the official GALIP checkpoint layout (docs/official_code.md#checkpoint-format, counts from #parameter-counts).

The official layout is checked at the paper's ViT-B/32 geometry (names, shapes, counts, an import round trip
with a GPU-style fp16 CLIP copy); its error paths run the same code at the tiny geometry, where writing a
checkpoint costs milliseconds instead of a 680 MB file.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

import galip
from galip.checkpoints import (
    FORMAT,
    build_generator,
    export_generator,
    import_official,
    load_official,
    read_export,
    to_official,
)
from galip.clip import load_clip
from galip.models import Discriminator, Generator
from tests.helpers import TINY_CLIP_CFG

TINY_SPEC = {"name": None, "model_cfg": TINY_CLIP_CFG}  # random-init CLIP: no weights source


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Move every weight off its init, so zero-init gates/affines take part in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def tiny_generator(clip, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return perturb_(Generator(clip, ngf=16, prompt_blocks=[1, 2]), seed).eval()


def tiny_discriminator(clip, seed: int = 0) -> Discriminator:
    torch.manual_seed(seed)
    geo = clip.geometry
    return perturb_(Discriminator(geo.width, geo.grid, geo.embed_dim, 3), seed).eval()


def inputs(clip, batch: int = 2, nz: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, nz, generator=gen), torch.randn(batch, clip.geometry.embed_dim, generator=gen)


def d_inputs(clip, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    geo, gen = clip.geometry, torch.Generator().manual_seed(seed)
    taps = torch.randn(batch, 3, geo.width, geo.grid, geo.grid, generator=gen)
    return taps, torch.randn(batch, geo.embed_dim, generator=gen)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# Generator export (safetensors)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_g(tiny_clip) -> Generator:
    return tiny_generator(tiny_clip)


@pytest.fixture(scope="module")
def tiny_export(tiny_g, tmp_path_factory):
    return export_generator(tiny_g, tmp_path_factory.mktemp("export") / "generator.safetensors", TINY_SPEC)


def test_export_round_trip_with_given_clip(tiny_g, tiny_clip, tiny_export):
    rebuilt = build_generator(tiny_export, clip=tiny_clip)
    assert rebuilt.config == tiny_g.config
    assert rebuilt.clip is tiny_clip
    assert_same_state(rebuilt.state_dict(), tiny_g.state_dict())
    assert not rebuilt.training and not any(p.requires_grad for p in rebuilt.parameters())
    z, s = inputs(tiny_clip)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(z, s), tiny_g(z, s), rtol=0, atol=0)


def test_official_layout_refuses_options_it_cannot_hold(tiny_clip):
    bigger = Generator(tiny_clip, ngf=16, prompt_blocks=[1], image_size=128)
    with pytest.raises(ValueError, match="image_size"):
        to_official(bigger, tiny_discriminator(tiny_clip))
    to_official(Generator(tiny_clip, ngf=16, prompt_blocks=[1], image_size=64), tiny_discriminator(tiny_clip))


def test_export_round_trip_of_a_generator_that_draws_more_than_its_clip_reads(tiny_clip, tmp_path):
    torch.manual_seed(0)
    g = perturb_(Generator(tiny_clip, ngf=16, prompt_blocks=[1], image_size=128), 0).eval()
    rebuilt = build_generator(export_generator(g, tmp_path / "g.safetensors", TINY_SPEC), clip=tiny_clip)
    z, s = inputs(tiny_clip)
    with torch.no_grad():
        out = rebuilt(z, s)
        torch.testing.assert_close(out, g(z, s), rtol=0, atol=0)
    assert out.shape[-1] == 128


def test_export_embeds_random_clip_and_restores_it(tiny_g, tiny_clip, tiny_export):
    state, _ = read_export(tiny_export)
    clip_keys = {k.removeprefix("clip.") for k in state if k.startswith("clip.")}
    assert clip_keys == set(tiny_clip.model.state_dict())

    torch.manual_seed(123)  # the rebuilt CLIP starts from other random weights than the fixture's
    rebuilt = build_generator(tiny_export)  # no clip=: rebuilt from the spec + the embedded weights
    assert rebuilt.clip is not tiny_clip
    assert_same_state(rebuilt.clip.model.state_dict(), tiny_clip.model.state_dict())
    z, s = inputs(tiny_clip)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(z, s), tiny_g(z, s), rtol=0, atol=0)


def test_rebuilt_clip_differs_without_embedded_weights():
    """Sanity check for the embedding test above: two random CLIPs from one spec really differ."""
    torch.manual_seed(1)
    a = load_clip(**TINY_SPEC).model.state_dict()
    torch.manual_seed(2)
    b = load_clip(**TINY_SPEC).model.state_dict()
    assert not torch.equal(a["visual.conv1.weight"], b["visual.conv1.weight"])


def test_export_without_embedded_clip_when_it_has_a_source(tiny_g, tmp_path):
    spec = {"name": "ViT-B-32-quickgelu", "pretrained": "openai"}
    path = export_generator(tiny_g, tmp_path / "g.safetensors", spec)
    state, meta = read_export(path)
    assert not any(k.startswith("clip.") for k in state)
    assert set(state) == set(tiny_g.state_dict())
    assert meta["clip"] == spec


def test_export_names_a_clip_file_inside_the_package_relative_to_it(tiny_g, tmp_path):
    """A shipped CLIP is recorded as ``galip:<path in the package>`` (it loads from any clone or install);
    a file elsewhere keeps its path."""
    from galip.clip.backbone import PACKAGE_DIR, _existing_file

    shipped = next((PACKAGE_DIR / "world" / "assets" / "clip").glob("*/clip.pt"))
    _, meta = read_export(export_generator(tiny_g, tmp_path / "a.safetensors", {"path": str(shipped)}))
    assert meta["clip"]["path"] == "galip:" + shipped.relative_to(PACKAGE_DIR).as_posix()
    assert _existing_file(meta["clip"]["path"]) == shipped
    _, meta = read_export(
        export_generator(tiny_g, tmp_path / "b.safetensors", {"path": "/elsewhere/clip.pt"})
    )
    assert meta["clip"]["path"] == "/elsewhere/clip.pt"


def test_export_metadata(tiny_g, tiny_export):
    with safe_open(str(tiny_export), "pt") as fh:
        raw = fh.metadata()
    assert raw["format"] == FORMAT == "galip-generator/1"
    assert raw["galip_version"] == galip.__version__
    assert json.loads(raw["generator"]) == tiny_g.config
    assert json.loads(raw["clip"]) == TINY_SPEC

    _, meta = read_export(tiny_export)
    assert meta["generator"] == tiny_g.config and meta["generator"]["ngf"] == 16
    assert meta["generator"]["prompt_blocks"] == [1, 2]
    assert meta["clip"] == TINY_SPEC


def test_export_drops_private_keys_of_an_omegaconf_spec(tiny_g, tmp_path):
    spec = OmegaConf.create({"_target_": "galip.clip.load_clip", **TINY_SPEC})
    _, meta = read_export(export_generator(tiny_g, tmp_path / "g.safetensors", spec))
    assert meta["clip"] == TINY_SPEC


def test_export_write_is_atomic(tiny_g, tmp_path):
    path = export_generator(tiny_g, tmp_path / "sub" / "generator.safetensors", TINY_SPEC)
    assert sorted(p.name for p in path.parent.iterdir()) == ["generator.safetensors"]
    # Overwriting goes through a temporary file too: the final name always holds a complete export.
    export_generator(tiny_g, path, TINY_SPEC)
    assert sorted(p.name for p in path.parent.iterdir()) == ["generator.safetensors"]
    read_export(path)


def test_failed_export_keeps_the_previous_file(tiny_g, tmp_path, monkeypatch):
    path = export_generator(tiny_g, tmp_path / "generator.safetensors", TINY_SPEC)
    before = path.read_bytes()

    def crash(state, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr("galip.checkpoints.save_file", crash)
    with pytest.raises(OSError, match="No space"):
        export_generator(tiny_g, path, TINY_SPEC)
    assert path.read_bytes() == before


def test_failed_export_leaves_no_tmp(tiny_g, tmp_path, monkeypatch):
    path = export_generator(tiny_g, tmp_path / "generator.safetensors", TINY_SPEC)

    def crash(state, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr("galip.checkpoints.save_file", crash)
    with pytest.raises(OSError):
        export_generator(tiny_g, path, TINY_SPEC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator.safetensors"]


def test_truncated_export_is_a_clear_error(tiny_export, tmp_path):
    data = tiny_export.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable galip generator export.*corrupt or truncated"):
        read_export(bad)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        build_generator(bad)


def test_garbage_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("these are not tensors\n")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_export(bad)


def test_foreign_safetensors_is_rejected(tmp_path):
    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(ValueError, match="not a galip generator export"):
        read_export(foreign)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not a galip generator export \(format=pt\)"):
        build_generator(other)


def test_missing_export_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "generator.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_export(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_generator(missing)


# ---------------------------------------------------------------------------------------------
# Official layout at the ViT-B/32 geometry (docs/official_code.md#checkpoint-format, #parameter-counts)
# ---------------------------------------------------------------------------------------------


def official_netg_keys() -> set[str]:
    """netG's 525 keys, written out from docs/official_code.md#checkpoint-format (without ``module.``)."""
    fuse = [
        f"fuse{f}.affine{a}.fc_{gb}.linear{n}.{p}"
        for f in (1, 2)
        for a in (0, 1)
        for gb in ("gamma", "beta")
        for n in (1, 2)
        for p in ("weight", "bias")
    ]
    wb = ("weight", "bias")
    keys = {f"fc_code.{p}" for p in wb}
    for i in range(4):
        keys |= {f"mapping.FBlocks.{i}.{c}.{p}" for c in ("conv1", "conv2") for p in wb}
        keys |= {f"mapping.FBlocks.{i}.{k}" for k in fuse}
    keys |= {f"mapping.{m}.{p}" for m in ("conv_fuse", "conv", "fc_prompt") for p in wb}
    clip = ["class_embedding", "positional_embedding", "conv1.weight", "ln_pre.weight", "ln_pre.bias"]
    block = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
    block += [f"{m}.{p}" for m in ("ln_1", "mlp.c_fc", "mlp.c_proj", "ln_2") for p in wb]
    clip += [f"transformer.resblocks.{i}.{k}" for i in range(12) for k in block]
    keys |= {f"mapping.CLIP_ViT.{k}" for k in clip}
    for i in range(6):
        keys |= {f"GBlocks.{i}.{c}.{p}" for c in ("c1", "c2") for p in wb}
        keys |= {f"GBlocks.{i}.{k}" for k in fuse}
    keys |= {f"GBlocks.{i}.c_sc.{p}" for i in (3, 4, 5) for p in wb}
    keys |= {f"to_rgb.1.{p}" for p in wb}
    return keys


def official_netd_keys() -> set[str]:
    block = ["gamma", "conv_r.0.weight", "conv_r.2.weight", "conv_s.weight", "conv_s.bias"]
    return {f"DBlocks.{i}.{k}" for i in (0, 1) for k in [*block, "beta"]} | {f"main.{k}" for k in block}


@pytest.fixture(scope="module")
def vitb32_official(vitb32_clip):
    """(G, D, to_official(G, D)) at the paper's geometry, weights moved off their init."""
    torch.manual_seed(0)
    g = perturb_(Generator(vitb32_clip), 0, scale=0.01).eval()
    d = perturb_(Discriminator(768, 7, 512, 3), 0).eval()
    return g, d, to_official(g, d)


def numel(state: dict) -> int:
    return sum(v.numel() for v in state.values())


def test_official_layout_counts_vitb32(vitb32_official):
    _, _, ckpt = vitb32_official
    net_g, net_d, net_c = (ckpt["model"][k] for k in ("netG", "netD", "netC"))
    assert (len(net_g), numel(net_g)) == (525, 139_284_675)
    assert (len(net_d), numel(net_d)) == (17, 28_706_821)
    assert (len(net_c), numel(net_c)) == (2, 2_099_200)
    clip_copy = {k: v for k, v in net_g.items() if k.startswith("module.mapping.CLIP_ViT.")}
    assert (len(clip_copy), numel(clip_copy)) == (149, 87_454_464)
    assert numel(net_g) - numel(clip_copy) == 51_830_211  # trainable
    assert numel(net_d) + numel(net_c) == 30_806_021  # D_paras


def test_official_layout_names_vitb32(vitb32_official):
    _, _, ckpt = vitb32_official
    net_g, net_d, net_c = (ckpt["model"][k] for k in ("netG", "netD", "netC"))
    for sd in (net_g, net_d, net_c):
        assert all(k.startswith("module.") for k in sd)
    assert {k.removeprefix("module.") for k in net_g} == official_netg_keys()
    assert {k.removeprefix("module.") for k in net_d} == official_netd_keys()
    assert set(net_c) == {"module.joint_conv.0.weight", "module.joint_conv.2.weight"}
    shapes = {
        "module.mapping.CLIP_ViT.transformer.resblocks.0.attn.in_proj_weight": (2304, 768),
        "module.mapping.CLIP_ViT.class_embedding": (768,),
        "module.mapping.CLIP_ViT.positional_embedding": (50, 768),
        "module.mapping.CLIP_ViT.conv1.weight": (768, 3, 32, 32),
        "module.fc_code.weight": (3136, 100),
        "module.mapping.conv_fuse.weight": (768, 64, 5, 5),
        "module.mapping.conv.weight": (512, 768, 5, 5),
        "module.mapping.fc_prompt.weight": (6144, 612),
        "module.to_rgb.1.weight": (3, 64, 3, 3),
        "module.GBlocks.3.c_sc.weight": (256, 512, 1, 1),
        "module.GBlocks.5.c_sc.weight": (64, 128, 1, 1),
    }
    assert {k: tuple(net_g[k].shape) for k in shapes} == shapes
    d_shapes = {
        "module.DBlocks.0.gamma": (1,),
        "module.DBlocks.0.beta": (1,),
        "module.DBlocks.0.conv_r.0.weight": (768, 768, 3, 3),
        "module.DBlocks.1.conv_s.weight": (768, 768, 1, 1),
        "module.main.conv_r.0.weight": (512, 768, 3, 3),
        "module.main.conv_r.2.weight": (512, 512, 3, 3),
        "module.main.conv_s.weight": (512, 768, 1, 1),
    }
    assert {k: tuple(net_d[k].shape) for k in d_shapes} == d_shapes
    assert tuple(net_c["module.joint_conv.0.weight"].shape) == (128, 1024, 4, 4)
    assert tuple(net_c["module.joint_conv.2.weight"].shape) == (1, 128, 4, 4)
    # official G_Block parameter order: c1, c2, fuse1, fuse2, c_sc (Adam state indices rely on it)
    block3 = [k.split(".")[3] for k in net_g if k.startswith("module.GBlocks.3.")]
    assert list(dict.fromkeys(block3)) == ["c1", "c2", "fuse1", "fuse2", "c_sc"]


def test_official_import_round_trip_vitb32_fp16_clip(vitb32_official, vitb32_clip, tmp_path):
    """Save in the official layout with a GPU-trained style fp16 CLIP copy, import into fresh modules."""
    g, d, ckpt = vitb32_official
    half = (
        "attn.",
        "mlp.",
        "conv1.",
    )  # conv/linear/attention tensors are fp16 on GPU (docs/official_code.md#precision)
    net_g = {
        k: v.half() if k.startswith("module.mapping.CLIP_ViT.") and any(h in k for h in half) else v
        for k, v in ckpt["model"]["netG"].items()
    }
    path = tmp_path / "state_epoch_001.pth"
    torch.save({**ckpt, "model": {**ckpt["model"], "netG": net_g}, "epoch": 1}, path)

    torch.manual_seed(1)
    g2, d2 = Generator(vitb32_clip).eval(), Discriminator(768, 7, 512, 3).eval()
    assert not torch.equal(g2.bridge.fc_code.weight, g.bridge.fc_code.weight)
    info = import_official(path, g2, d2, check_clip=True)
    assert info == {"epoch": 1}
    assert_same_state(g2.state_dict(), g.state_dict())
    assert_same_state(d2.state_dict(), d.state_dict())

    z, s = inputs(vitb32_clip, batch=1)
    taps, sent = d_inputs(vitb32_clip, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(g2(z, s), g(z, s), rtol=0, atol=0)
        torch.testing.assert_close(d2(taps, sent), d(taps, sent), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Official layout: round trip and error paths (tiny geometry, same code)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_official(tiny_clip):
    g, d = tiny_generator(tiny_clip, seed=3), tiny_discriminator(tiny_clip, seed=3)
    return g, d, to_official(g, d)


def fresh(tiny_clip) -> tuple[Generator, Discriminator]:
    return tiny_generator(tiny_clip, seed=9), tiny_discriminator(tiny_clip, seed=9)


def test_official_round_trip_tiny(tiny_official, tiny_clip, tmp_path):
    g, d, ckpt = tiny_official
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    g2, d2 = fresh(tiny_clip)
    assert import_official(path, g2, d2) == {"epoch": 0}
    assert_same_state(g2.state_dict(), g.state_dict())
    assert_same_state(d2.state_dict(), d.state_dict())
    z, s = inputs(tiny_clip, batch=1)
    taps, sent = d_inputs(tiny_clip, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(g2(z, s), g(z, s), rtol=0, atol=0)
        torch.testing.assert_close(d2(taps, sent), d(taps, sent), rtol=0, atol=0)


def test_official_round_trip_without_ddp_prefix(tiny_official, tiny_clip, tmp_path):
    g, d, _ = tiny_official
    ckpt = to_official(g, d, ddp_prefix=False)
    assert not any(k.startswith("module.") for sd in ckpt["model"].values() for k in sd)
    path = tmp_path / "single_gpu.pth"
    torch.save(ckpt, path)
    g2, d2 = fresh(tiny_clip)
    import_official(path, g2, d2)
    assert_same_state(g2.state_dict(), g.state_dict())
    assert_same_state(d2.state_dict(), d.state_dict())


def test_official_generator_only(tiny_official, tiny_clip, tmp_path):
    g, _, ckpt = tiny_official
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    g2, d2 = fresh(tiny_clip)
    d2_before = {k: v.clone() for k, v in d2.state_dict().items()}
    import_official(path, g2)
    assert_same_state(g2.state_dict(), g.state_dict())
    assert_same_state(d2.state_dict(), d2_before)


def test_official_clip_copy_must_match(tiny_official, tiny_clip, tmp_path):
    g, d, ckpt = tiny_official
    key = "module.mapping.CLIP_ViT.transformer.resblocks.2.mlp.c_fc.weight"
    ckpt["model"]["netG"][key] = ckpt["model"]["netG"][key] + 0.5
    path = tmp_path / "other_clip.pth"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"resblocks\.2\.mlp\.c_fc\.weight differs from the loaded CLIP"):
        import_official(path, *fresh(tiny_clip))
    g2, d2 = fresh(tiny_clip)
    import_official(path, g2, d2, check_clip=False)  # the documented escape hatch
    assert_same_state(g2.state_dict(), g.state_dict())


def test_official_unknown_key_is_named(tiny_official, tiny_clip, tmp_path):
    _, _, ckpt = tiny_official
    ckpt["model"]["netG"]["module.mapping.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(ckpt, path)
    with pytest.raises(KeyError, match=r"mapping\.extra_head\.weight"):
        import_official(path, *fresh(tiny_clip))


def test_official_unknown_clip_copy_key_is_named(tiny_official, tiny_clip, tmp_path):
    _, _, ckpt = tiny_official
    ckpt["model"]["netG"]["module.mapping.CLIP_ViT.ln_extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra_clip.pth"
    torch.save(ckpt, path)
    with pytest.raises(KeyError, match=r"CLIP_ViT\.ln_extra\.weight"):
        import_official(path, *fresh(tiny_clip))


@pytest.mark.parametrize(
    ("net", "key", "ours"),
    [
        ("netG", "module.to_rgb.1.bias", "decoder.to_rgb.bias"),
        ("netG", "module.GBlocks.1.fuse2.affine0.fc_beta.linear2.weight", "fc_beta.linear2.weight"),
        ("netD", "module.DBlocks.1.beta", "extractor.blocks.1.beta"),
        ("netC", "module.joint_conv.2.weight", "assessor.joint_conv.2.weight"),
    ],
)
def test_official_missing_key_is_named(tiny_official, tiny_clip, tmp_path, net, key, ours):
    _, _, ckpt = tiny_official
    del ckpt["model"][net][key]
    path = tmp_path / "missing.pth"
    torch.save(ckpt, path)
    with pytest.raises(KeyError, match=rf"missing \[[^]]*{ours}"):
        import_official(path, *fresh(tiny_clip))


def test_official_truncated_file(tiny_official, tmp_path):
    path = tmp_path / "state_epoch_001.pth"
    torch.save(tiny_official[2], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_official(path)


def test_official_foreign_dict(tiny_official, tiny_clip, tmp_path):
    g = tiny_official[0]
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": g.state_dict(), "epoch": 3}, path)
    with pytest.raises(ValueError, match="not an official GALIP checkpoint"):
        import_official(path, *fresh(tiny_clip))
    bare = tmp_path / "bare.pth"
    torch.save(g.state_dict(), bare)
    with pytest.raises(ValueError, match="not an official GALIP checkpoint"):
        load_official(bare)


def test_official_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "state_epoch_100.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_official(missing)
