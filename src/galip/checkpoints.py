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
from galip.cache import _plain
from galip.clip import FrozenCLIP, load_clip
from galip.models import Generator

FORMAT = "galip-generator/1"
CLIP_PREFIX = "clip."


def export_generator(generator: Generator, path: str | Path, clip_spec: Mapping[str, Any]) -> Path:
    """Write G's weights + what is needed to rebuild it (``clip_spec``: kwargs of ``galip.clip.load_clip``).

    A CLIP with no weights source (random init: tests, smoke runs) cannot be rebuilt from its spec, so
    its weights go into the file too, under ``clip.``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {k: v for k, v in _plain(clip_spec).items() if not k.startswith("_")}
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
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a half file under the final name
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
        raise ValueError(f"{path} is not a readable galip generator export (corrupt or truncated?): {err}") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a galip generator export (format={meta.get('format')})")
    return state, {**meta, "generator": json.loads(meta["generator"]), "clip": json.loads(meta["clip"])}


def build_generator(path: str | Path, clip: FrozenCLIP | None = None, **clip_overrides: Any) -> Generator:
    """Rebuild the exported generator (and its CLIP, unless one is given) with the exported weights."""
    state, meta = read_export(path)
    clip_state = {k[len(CLIP_PREFIX) :]: state.pop(k) for k in [k for k in state if k.startswith(CLIP_PREFIX)]}
    if clip is None:
        clip = load_clip(**{**meta["clip"], **clip_overrides})
        if clip_state:
            clip.model.load_state_dict(clip_state, strict=True)
    generator = Generator(clip, **meta["generator"])
    generator.load_state_dict(state, strict=True)
    return generator.eval().requires_grad_(False)
