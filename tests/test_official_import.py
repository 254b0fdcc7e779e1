"""The official-checkpoint import against a correspondence written by hand, not by the export code.

A round trip (``to_official`` then ``import_official``) passes whenever the two are each other's inverse, even if
both put a tensor in the wrong layer. Here the official-layout file holds values of its own (each tensor drawn
from its official name), and the import is checked against a second, hand-written reading of
docs/official_code.md#checkpoint-format: every official tensor lands in the galip parameter named there, and
swapping two same-shaped official layers changes G's and D's output, so a mix-up could not go unnoticed.
"""

from __future__ import annotations

import re
import zlib

import pytest
import torch

from galip.checkpoints import import_official, to_official
from tests.test_checkpoints import d_inputs, inputs, tiny_discriminator, tiny_generator

# official name -> galip name, as docs/official_code.md states it (the first matching rule applies)
BY_HAND = [
    (r"^fc_code\.", "bridge.fc_code."),
    (r"^mapping\.FBlocks\.(\d+)\.", r"bridge.blocks.\1."),
    (r"^mapping\.conv_fuse\.", "bridge.conv_fuse."),
    (r"^mapping\.fc_prompt\.", "prompts.fc_prompt."),
    (r"^mapping\.conv\.", "decoder.stem."),
    (r"^GBlocks\.(\d+)\.c_sc\.", r"decoder.blocks.\1.shortcut."),
    (r"^GBlocks\.(\d+)\.", r"decoder.blocks.\1."),
    (r"^to_rgb\.1\.", "decoder.to_rgb."),
    (r"^DBlocks\.(\d+)\.", r"extractor.blocks.\1."),
    (r"^main\.", "extractor.main."),
    (r"^joint_conv\.", "assessor.joint_conv."),
]
UNUSED = (r"^mapping\.CLIP_ViT\.", r"^DBlocks\.\d+\.conv_s\.")  # the frozen CLIP copy, DBlocks' dead conv_s


def galip_name(official: str) -> str:
    for pattern, replacement in BY_HAND:
        if re.match(pattern, official):
            return re.sub(pattern, replacement, official)
    raise AssertionError(f"no hand-written rule for {official}")


def own_values(layout: dict) -> dict:
    """The official layout (names and shapes) with values drawn from each tensor's own name; the CLIP copy kept."""
    out = {}
    for net, state in layout["model"].items():
        out[net] = {}
        for key, value in state.items():
            bare = key.removeprefix("module.")
            if re.match(UNUSED[0], bare):
                out[net][key] = value
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(f"{net}.{bare}".encode()))
            out[net][key] = torch.randn(value.shape, generator=gen) * 0.05
    return {"model": out, "epoch": 7}


@pytest.fixture
def official_file(tiny_clip, tmp_path):
    g, d = tiny_generator(tiny_clip, seed=1), tiny_discriminator(tiny_clip, seed=1)
    ckpt = own_values(to_official(g, d))  # to_official only for the names and shapes
    path = tmp_path / "state_epoch_007.pth"
    torch.save(ckpt, path)
    return ckpt, path


def imported(tiny_clip, path):
    g, d = tiny_generator(tiny_clip, seed=2), tiny_discriminator(tiny_clip, seed=2)
    assert import_official(path, g, d) == {"epoch": 7}
    return g, d


def outputs(tiny_clip, g, d) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return g(*inputs(tiny_clip, batch=2)), d(*d_inputs(tiny_clip, batch=2))


def test_every_official_tensor_lands_where_the_docs_say(official_file, tiny_clip):
    ckpt, path = official_file
    g, d = imported(tiny_clip, path)
    ours = {**g.state_dict(), **{f"D.{k}": v for k, v in d.state_dict().items()}}
    placed = set()
    for net, state in ckpt["model"].items():
        for key, value in state.items():
            bare = key.removeprefix("module.")
            if any(re.match(p, bare) for p in UNUSED):
                continue
            name = galip_name(bare) if net == "netG" else f"D.{galip_name(bare)}"
            assert torch.equal(ours[name], value), f"{net}.{bare} -> {name}"
            placed.add(name)
    assert placed == set(ours)  # every galip parameter came from the file


def test_same_shaped_layers_hold_different_values_in_the_file(official_file):
    """The file tells same-shaped layers apart, so the check above would see a swap of any two of them."""
    net_g, net_d = (official_file[0]["model"][n] for n in ("netG", "netD"))
    pairs = [
        (net_g, "mapping.FBlocks.0.conv1.weight", "mapping.FBlocks.1.conv1.weight"),
        (
            net_g,
            "GBlocks.0.fuse1.affine0.fc_gamma.linear2.weight",
            "GBlocks.0.fuse2.affine0.fc_gamma.linear2.weight",
        ),
        (
            net_g,
            "GBlocks.1.fuse1.affine0.fc_gamma.linear1.bias",
            "GBlocks.1.fuse1.affine0.fc_beta.linear1.bias",
        ),
        (net_d, "DBlocks.0.conv_r.0.weight", "DBlocks.1.conv_r.0.weight"),
    ]
    for state, a, b in pairs:
        a, b = state[f"module.{a}"], state[f"module.{b}"]
        assert a.shape == b.shape and not torch.equal(a, b)


@pytest.mark.parametrize(
    "net, a, b",
    [
        ("netG", "mapping.FBlocks.0.", "mapping.FBlocks.1."),
        ("netG", "GBlocks.0.fuse1.", "GBlocks.0.fuse2."),
        ("netD", "DBlocks.0.", "DBlocks.1."),
    ],
)
def test_swapping_two_same_shaped_official_layers_changes_the_output(
    official_file, tiny_clip, tmp_path, net, a, b
):
    ckpt, path = official_file
    reference = outputs(tiny_clip, *imported(tiny_clip, path))
    state = ckpt["model"][net]
    swapped = dict(state)
    for key in [k for k in state if k.startswith(f"module.{a}")]:
        other = key.replace(a, b, 1)
        swapped[key], swapped[other] = state[other], state[key]
    path2 = tmp_path / "swapped.pth"
    torch.save({"model": {**ckpt["model"], net: swapped}, "epoch": 7}, path2)
    g_out, d_out = outputs(tiny_clip, *imported(tiny_clip, path2))
    changed = g_out if net == "netG" else d_out
    assert not torch.allclose(changed, reference[0] if net == "netG" else reference[1], atol=1e-6)
