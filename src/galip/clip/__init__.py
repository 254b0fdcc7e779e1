"""The frozen CLIP: the only package that knows open_clip internals."""

from galip.clip.backbone import (
    CLIPGeometry,
    CLIPWeightsMissing,
    FrozenCLIP,
    config_depth,
    load_clip,
    model_config,
    resize_square,
)

__all__ = [
    "CLIPGeometry",
    "CLIPWeightsMissing",
    "FrozenCLIP",
    "config_depth",
    "load_clip",
    "model_config",
    "resize_square",
]
