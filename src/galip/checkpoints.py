"""Generator-only export: the small file that sampling loads (no optimizer, no D, no CLIP weights).

A ``.safetensors`` file holding G's weights (the EMA weights when training kept them) and, in its
metadata, the generator's constructor arguments and the CLIP it needs (the ``clip`` config: name +
pretrained tag, local path, or architecture dict). The CLIP itself is loaded from its own source, so an
export is ~200 MB for the paper's model instead of ~1 GB for a training checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from galip import __version__
from galip.atomic_io import atomic_path
from galip.clip import FrozenCLIP, load_clip
from galip.clip.backbone import package_relative
from galip.config import to_plain
from galip.models import Generator

FORMAT = "galip-generator/1"
CLIP_PREFIX = "clip."


def export_generator(generator: Generator, path: str | Path, clip_spec: Mapping[str, Any]) -> Path:
    """Write G's weights + what is needed to rebuild it (``clip_spec``: kwargs of ``galip.clip.load_clip``).

    A CLIP file inside the package (the shipped shapes CLIPs) is recorded as ``galip:<path in the package>``.
    A CLIP with no weights source (random init: tests, smoke runs) cannot be rebuilt from its spec, so
    its weights go into the file too, under ``clip.``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {k: v for k, v in to_plain(clip_spec).items() if not k.startswith("_")}
    if spec.get("path"):  # a shipped CLIP is named inside the package, so the export loads from any install
        spec["path"] = package_relative(spec["path"])
    metadata = {
        "format": FORMAT,
        "galip_version": __version__,
        "generator": json.dumps(generator.config),
        "clip": json.dumps(spec),
    }
    state = dict(generator.state_dict())
    if not spec.get("pretrained") and not spec.get("path"):
        state.update({f"{CLIP_PREFIX}{k}": v for k, v in generator.clip.model.state_dict().items()})
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and parsed metadata of an export; clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator export {str(path)!r} does not exist")
    try:
        state = load_file(str(path))
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(header_len)).get("__metadata__", {})
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable galip generator export (corrupt or truncated?): {err}"
        ) from err
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a galip generator export (format={meta.get('format')})"
        )
    return state, {**meta, "generator": json.loads(meta["generator"]), "clip": json.loads(meta["clip"])}


def build_generator(path: str | Path, clip: FrozenCLIP | None = None, **clip_overrides: Any) -> Generator:
    """Rebuild the exported generator (and its CLIP, unless one is given) with the exported weights."""
    state, meta = read_export(path)
    clip_state = {
        k[len(CLIP_PREFIX) :]: state.pop(k) for k in [k for k in state if k.startswith(CLIP_PREFIX)]
    }
    if clip is None:
        clip = load_clip(**{**meta["clip"], **clip_overrides})
        if clip_state:
            clip.model.load_state_dict(clip_state, strict=True)
    generator = Generator(clip, **meta["generator"])
    generator.load_state_dict(state, strict=True)
    return generator.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Official GALIP checkpoints (docs/official_code.md#checkpoint-format): {'model': {'netG', 'netD', 'netC'}, 'optimizers', 'epoch'}
# ---------------------------------------------------------------------------------------------

# (official prefix, our prefix), first match wins; applied to keys after any `module.` prefix is removed.
OFFICIAL_G_MAP = (
    ("fc_code.", "bridge.fc_code."),
    ("mapping.FBlocks.", "bridge.blocks."),
    ("mapping.conv_fuse.", "bridge.conv_fuse."),
    ("mapping.fc_prompt.", "prompts.fc_prompt."),
    ("mapping.conv.", "decoder.stem."),
    ("GBlocks.", "decoder.blocks."),
    ("to_rgb.1.", "decoder.to_rgb."),
)
OFFICIAL_D_MAP = (("DBlocks.", "extractor.blocks."), ("main.", "extractor.main."))
OFFICIAL_C_MAP = (("joint_conv.", "assessor.joint_conv."),)
# The official NetG carries a frozen copy of CLIP's visual tower; ours shares the one frozen CLIP.
OFFICIAL_CLIP_COPY = "mapping.CLIP_ViT."


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DDP-trained files prefix every key with ``module.``."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def map_keys(state: dict[str, torch.Tensor], table, what: str) -> dict[str, torch.Tensor]:
    """Rename by prefix table; a key no rule covers is an error that names it."""
    out, unknown = {}, []
    for key, value in state.items():
        rule = next(((old, new) for old, new in table if key.startswith(old)), None)
        if rule is None:
            unknown.append(key)
            continue
        out[rule[1] + key[len(rule[0]) :]] = value
    if unknown:
        raise KeyError(
            f"{what}: keys with no mapping to galip: {unknown[:8]}{' …' if len(unknown) > 8 else ''}"
        )
    return {k.replace(".c_sc.", ".shortcut."): v for k, v in out.items()}


def official_generator_state(net_g: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split the official netG state into (our generator's state, the frozen CLIP copy's state)."""
    net_g = strip_module_prefix(net_g)
    clip_copy = {
        k[len(OFFICIAL_CLIP_COPY) :]: v for k, v in net_g.items() if k.startswith(OFFICIAL_CLIP_COPY)
    }
    own = {k: v for k, v in net_g.items() if not k.startswith(OFFICIAL_CLIP_COPY)}
    return {k: v.float() for k, v in map_keys(own, OFFICIAL_G_MAP, "netG").items()}, clip_copy


def official_discriminator_state(net_d: dict[str, torch.Tensor], net_c: dict[str, torch.Tensor]) -> dict:
    """netD + netC -> our Discriminator; DBlocks' never-used ``conv_s`` (same in and out width) is dropped."""
    net_d = strip_module_prefix(net_d)
    state = {
        **map_keys(net_d, OFFICIAL_D_MAP, "netD"),
        **map_keys(strip_module_prefix(net_c), OFFICIAL_C_MAP, "netC"),
    }
    return {
        k: v.float() for k, v in state.items() if not (k.startswith("extractor.blocks.") and ".conv_s." in k)
    }


def load_official(path: str | Path) -> dict[str, Any]:
    """Read an official ``state_epoch_*.pth`` / ``pre_cc12m.pth`` safely (weights_only) with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official GALIP checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise ValueError(
            f"{path} could not be read as a GALIP checkpoint (corrupt or truncated?): {err}"
        ) from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "netG" not in ckpt["model"]:
        raise ValueError(
            f"{path} is not an official GALIP checkpoint: expected {{'model': {{'netG', 'netD', 'netC'}}}}"
        )
    return ckpt


def import_official(
    path: str | Path,
    generator: Generator,
    discriminator: torch.nn.Module | None = None,
    check_clip: bool = True,
) -> dict[str, Any]:
    """Load official weights into our modules, strictly (missing or unexpected keys are errors that name them).

    ``check_clip`` compares the file's frozen CLIP copy with the CLIP ``generator`` uses (fp16 tolerance)
    and fails if they differ: the official G was trained around that exact CLIP.
    """
    ckpt = load_official(path)
    g_state, clip_copy = official_generator_state(ckpt["model"]["netG"])
    _load_strict(generator, g_state, "netG")
    if check_clip and clip_copy:
        _check_clip_copy(generator.clip, clip_copy)
    if discriminator is not None:
        _load_strict(
            discriminator,
            official_discriminator_state(ckpt["model"]["netD"], ckpt["model"]["netC"]),
            "netD/netC",
        )
    return {"epoch": ckpt.get("epoch")}


def _load_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{what} does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}")


def _check_clip_copy(clip: FrozenCLIP, clip_copy: dict[str, torch.Tensor]) -> None:
    ours = clip.visual.state_dict()
    for key, value in clip_copy.items():
        if key not in ours:
            raise KeyError(f"netG.{OFFICIAL_CLIP_COPY}{key}: not a parameter of this CLIP's visual tower")
        if torch.equal(ours[key].to(value.dtype), value):  # same weights (fp32, or fp16 as clip.load casts)
            continue
        if not torch.allclose(ours[key].float(), value.float(), atol=1e-2, rtol=1e-2):
            raise ValueError(
                f"netG.{OFFICIAL_CLIP_COPY}{key} differs from the loaded CLIP: the checkpoint was trained with other "
                "CLIP weights (the paper uses ViT-B-32-quickgelu / openai); pass check_clip=False to ignore"
            )


def to_official(
    generator: Generator, discriminator: torch.nn.Module, ddp_prefix: bool = True
) -> dict[str, Any]:
    """Our weights in the official layout (the inverse of :func:`import_official`): for round-trip tests and
    for running the official code on weights trained here. The unused official parameters (CLIP ``conv1``
    copy is included, DBlocks' ``conv_s``) are filled as the official code would hold them."""

    def invert(state: dict, table) -> dict:
        out = {}
        for key, value in state.items():
            key = key.replace(".shortcut.", ".c_sc.")
            old, new = next((o, n) for o, n in table if key.startswith(n))
            out[old + key[len(new) :]] = value
        return out

    if generator.config.get("image_size") not in (None, generator.clip.geometry.image_size):
        raise ValueError(
            "the official layout has no place for model.generator.image_size other than CLIP's input size: "
            "only a paper-architecture G converts"
        )
    net_g = invert(generator.state_dict(), OFFICIAL_G_MAP)
    net_g.update(
        {OFFICIAL_CLIP_COPY + k: v for k, v in generator.clip.visual.state_dict().items() if _in_clip_copy(k)}
    )
    d_state = discriminator.state_dict()
    net_d = invert({k: v for k, v in d_state.items() if k.startswith("extractor.")}, OFFICIAL_D_MAP)
    for key in [k for k in net_d if k.startswith("DBlocks.") and k.endswith(".conv_r.0.weight")]:
        block, width = key.split(".conv_r")[0], net_d[key].shape[1]
        net_d[f"{block}.conv_s.weight"] = torch.zeros(width, width, 1, 1)
        net_d[f"{block}.conv_s.bias"] = torch.zeros(width)
    net_c = invert({k: v for k, v in d_state.items() if k.startswith("assessor.")}, OFFICIAL_C_MAP)
    prefix = "module." if ddp_prefix else ""
    model = {
        name: {prefix + k: v for k, v in sd.items()}
        for name, sd in (("netG", net_g), ("netD", net_d), ("netC", net_c))
    }
    return {"model": model, "epoch": 0}


def _in_clip_copy(key: str) -> bool:
    """The official copy holds the visual tower without ``ln_post`` and ``proj``."""
    return not (key.startswith("ln_post") or key == "proj")
