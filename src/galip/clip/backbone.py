"""Load a frozen open_clip model and expose what GALIP needs of it.

This package is the only code that knows open_clip internals. Everything above it sees a
:class:`FrozenCLIP`: a tokenizer, sentence vectors, the D-side taps, the G-side mapper and the
geometry (width, grid, depth, embed dim, input size) read from the loaded model.

Three sources of weights:

* an open_clip model name + pretrained tag (the paper: ``ViT-B-32-quickgelu`` + ``openai``), read
  from the local Hugging Face cache; a tag that is not cached fails at once unless ``download=True``;
* a local file: an OpenAI state dict, an OpenAI TorchScript archive, or an open_clip / Lightning
  checkpoint (``state_dict`` inside, optional ``module.``/``model.`` prefixes);
* an architecture given as a dict (``model_cfg``), random-init or with ``path`` weights — the tiny
  test CLIPs and the embedded world's CLIP.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from galip.clip import blocks, mapper, taps, text

# Keys of an OpenAI state dict that are metadata, not tensors of the model (open_clip rejects them).
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
_WRAPPER_PREFIXES = ("module.", "model.", "clip.")
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class CLIPWeightsMissing(FileNotFoundError):
    """Raised when CLIP weights are not available locally; the message says how to get them."""


@dataclass(frozen=True)
class CLIPGeometry:
    """Shapes that the GALIP networks are built around, read from the loaded model."""

    width: int  # visual transformer width (768 for ViT-B/32)
    grid: int  # patch grid side (7 for ViT-B/32 at 224 px)
    depth: int  # number of visual transformer blocks (12)
    embed_dim: int  # joint embedding / sentence vector size (512)
    image_size: int  # CLIP input resolution (224)
    context_length: int  # text tokens (77)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def model_config(name: str | None = None, model_cfg: Mapping | None = None) -> dict:
    """The open_clip architecture dict for a built-in name or an explicit config (no weights built)."""
    if model_cfg is not None:
        return _to_plain(model_cfg)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"clip.name={name!r} is not an open_clip model; known: {', '.join(open_clip.list_models())}"
        )
    return cfg


def config_depth(name: str | None = None, model_cfg: Mapping | None = None) -> int:
    """Number of visual blocks, read from the config alone so overrides can be checked before building."""
    return int(model_config(name, model_cfg)["vision_cfg"]["layers"])


def load_clip(
    name: str | None = "ViT-B-32-quickgelu",
    pretrained: str | None = None,
    path: str | os.PathLike | None = None,
    model_cfg: Mapping | None = None,
    cache_dir: str | None = None,
    download: bool = False,
    resize_mode: str = "bilinear",
    official_preprocess_bug: bool = False,
) -> FrozenCLIP:
    """Build the frozen CLIP. ``pretrained=None`` and ``path=None`` give random weights (tests, benchmarks).

    ``resize_mode`` is how images that are not at CLIP's input size are resized for it (the official code
    uses ``nearest``); ``official_preprocess_bug`` reproduces the official [0.5, 1] pixel mapping, only for
    continuing or evaluating official checkpoints exactly (docs/official_code.md#clip-pre-processing).
    """
    # Find the weights first: a missing file or an uncached tag must fail before a (slow) model build.
    weights = None
    if path is not None:
        weights = _existing_file(path)
    elif pretrained is not None:
        weights = resolve_pretrained(name, pretrained, cache_dir, download)
    model = _build(name, model_cfg)
    if weights is not None:
        load_weights_file(model, weights)
    clip = FrozenCLIP(model, tokenizer_name=name if model_cfg is None else None)
    clip.resize_mode, clip.official_preprocess_bug = resize_mode, official_preprocess_bug
    return clip


# A weights file inside the installed package (the shipped shapes CLIPs), as an export names it: the same
# file wherever the package is installed or the clone lives.
PACKAGE_PREFIX = "galip:"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def package_relative(path: str | os.PathLike) -> str:
    """``galip:world/assets/clip/<key>/clip.pt`` for a file inside the package, else the path unchanged."""
    resolved = Path(path).expanduser().resolve()
    if resolved.is_relative_to(PACKAGE_DIR):
        return PACKAGE_PREFIX + resolved.relative_to(PACKAGE_DIR).as_posix()
    return str(path)


def _existing_file(path: str | os.PathLike) -> Path:
    text = str(path)
    path = (
        PACKAGE_DIR / text[len(PACKAGE_PREFIX) :]
        if text.startswith(PACKAGE_PREFIX)
        else Path(path).expanduser()
    )
    if not path.is_file():
        raise CLIPWeightsMissing(f"clip.path={str(path)!r} does not exist (expected a CLIP checkpoint file)")
    return path


def _build(name: str | None, model_cfg: Mapping | None) -> nn.Module:
    cfg = model_config(name, model_cfg)
    if model_cfg is None:
        # open_clip warns "initialized randomly" here; weights, if any, are loaded right after.
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            return open_clip.create_model(name, pretrained=None)
        finally:
            logger.setLevel(level)
    return open_clip.CLIP(**cfg)


def resolve_pretrained(name: str, tag: str, cache_dir: str | None = None, download: bool = False) -> str:
    """Local path of ``name``/``tag`` weights: a file path as is, a tag from the cache (or downloaded)."""
    if Path(tag).expanduser().is_file():
        return str(Path(tag).expanduser())
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ValueError(f"clip.pretrained={tag!r} is neither a file nor a tag of {name} (tags: {tags})")
    cached = _cached_hf_file(cfg.get("hf_hub", ""), cache_dir)
    if cached:
        return cached
    if download and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        return open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    raise CLIPWeightsMissing(
        f"CLIP weights {name}/{tag} are not in the local cache. Either run once with clip.download=true on a "
        f"machine with internet (they go to the Hugging Face cache, hub repo {cfg.get('hf_hub') or cfg.get('url')}), "
        f"or point clip.path=/path/to/weights (an OpenAI ViT-B-32.pt, TorchScript or state dict, or an open_clip "
        f"checkpoint)."
    )


def _cached_hf_file(hf_hub: str, cache_dir: str | None) -> str | None:
    if not hf_hub:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = (
        os.path.split(hf_hub.rstrip("/")) if not hf_hub.endswith("/") else (hf_hub.rstrip("/"), "")
    )
    for candidate in [filename] if filename else _HF_WEIGHT_FILES:
        hit = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
        if isinstance(hit, str):
            return hit
    return None


def load_weights_file(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an OpenAI (state dict or TorchScript), open_clip or Lightning checkpoint file, strictly."""
    path = _existing_file(path)
    # Non-persistent buffers (open_clip's attn_mask) are rebuilt by the model; TorchScript archives still carry them.
    persistent = model.state_dict().keys()
    transient = {name for name, _ in model.named_buffers() if name not in persistent}
    state = {k: v for k, v in clean_state_dict(_read_state_dict(path)).items() if k not in transient}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this CLIP architecture: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if _is_torchscript(path):
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


def clean_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Drop OpenAI metadata keys and wrapper prefixes (``module.`` from DDP, ``model.`` from Lightning)."""
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        while key.startswith(_WRAPPER_PREFIXES):  # any order and depth: "module.clip.model.visual…"
            key = key.split(".", 1)[1]
        if key in _OPENAI_META_KEYS:
            continue
        out[key] = value.float() if value.is_floating_point() else value
    return out


def _to_plain(cfg: Mapping) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return {k: _to_plain(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}


# ---------------------------------------------------------------------------------------------
# The frozen model
# ---------------------------------------------------------------------------------------------


def _warn_if_off_the_fast_path(visual: nn.Module) -> None:
    """Say so when open_clip's block layout is not the one `blocks.run_block` computes itself: the blocks then
    run through their own forward, correct but slower (tests/test_speed_levers.py fails on such an open_clip)."""
    slow = [i for i, block in enumerate(visual.transformer.resblocks) if not blocks._is_plain(block)]
    if slow:
        warnings.warn(
            f"CLIP blocks {slow} are not open_clip's plain ResidualAttentionBlock (open_clip "
            f"{open_clip.__version__}): they run through their own forward, without galip's fast attention path",
            stacklevel=3,
        )


def resize_square(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Images [B, C, H, W] -> [B, C, size, size] (unchanged if already that size); antialiased for
    bilinear/bicubic, so a CLIP that reads a smaller image than G draws sees an area-weighted downsample."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    antialias = mode in ("bilinear", "bicubic")
    align = {"align_corners": False} if antialias else {}
    return F.interpolate(x, size=(size, size), mode=mode, antialias=antialias, **align)


class FrozenCLIP(nn.Module):
    """An open_clip model that is never trained and always in eval mode.

    G and D hold *references* to one instance (not submodules), so its weights live once in memory and
    never appear in their parameters, optimizers or trainable counts.
    """

    def __init__(self, model: nn.Module, tokenizer_name: str | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        visual = model.visual
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.geometry = CLIPGeometry(
            width=visual.class_embedding.shape[-1],
            grid=visual.grid_size[0],
            depth=len(visual.transformer.resblocks),
            embed_dim=model.text_projection.shape[-1]
            if model.text_projection is not None
            else model.embed_dim,
            image_size=visual.image_size[0],
            context_length=model.context_length,
        )
        _warn_if_off_the_fast_path(visual)
        self._tokenizer = (
            open_clip.get_tokenizer(tokenizer_name)
            if tokenizer_name
            else open_clip.SimpleTokenizer(context_length=self.geometry.context_length)
        )
        # The official code maps [0,1] pixels to [0.5,1] before normalising (docs/official_code.md#clip-pre-processing); off by default.
        self.official_preprocess_bug = False
        self.resize_mode = "bilinear"
        super().train(False)  # the wrapper itself too: nn.Module.__init__ left it in training mode

    def train(self, mode: bool = True) -> FrozenCLIP:  # frozen: never leaves eval mode
        return super().train(False)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    # -- text -----------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The open_clip tokenizer (picklable, so data workers can hold it without the model)."""
        return self._tokenizer

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids [B, context_length] (truncated, EOT kept)."""
        return self._tokenizer(list(captions))

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sentence vectors [B, embed_dim]: projected EOT feature, not normalised (paper's ``s``)."""
        return text.sentence_vectors(self.model, tokens.to(self.mean.device)).float()

    # -- image ----------------------------------------------------------------------------------

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> CLIP-normalised input at CLIP's resolution."""
        x = (image + 1) * 0.5
        if self.official_preprocess_bug:
            x = (x + 1) * 0.5
        x = resize_square(x, self.geometry.image_size, self.resize_mode)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def image_taps(
        self, image: torch.Tensor, blocks: Sequence[int], with_embedding: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D-side features: ([B, n_taps, width, grid, grid], image embedding [B, embed_dim] or None)."""
        return taps.image_taps(self.visual, self.preprocess(image), blocks, with_embedding)

    def map_bridge(
        self, bridge: torch.Tensor, prompts: torch.Tensor | None, prompt_blocks: Sequence[int]
    ) -> torch.Tensor:
        """G-side: bridge feature [B, width, grid, grid] through the prompted frozen ViT, same shape out."""
        return mapper.map_bridge(self.visual, bridge, prompts, prompt_blocks)
