"""Does a CLIP see an attribute? Zero-shot probe on real shapes-world scenes.

For each val scene, one object's shape (or colour) is swapped for every other value in the caption; the probe
counts how often the CLIP's image embedding is closest to the true caption (chance: 1/4 for shape, 1/8 for
colour). GALIP's D and its CLIP loss can only pass on what this CLIP sees.

    python -m galip.clip_probe                      # the demo's shapes CLIP (shipped or cached)
    python -m galip.clip_probe path/to/clip.pt 400  # another checkpoint of the tiny architecture, N scenes
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from galip.clip import FrozenCLIP, load_clip
from galip.data.shapes import COLOUR_NAMES, SHAPES, Scene, ShapesWorld, pil_to_tensor

ATTRIBUTES = {"shape": tuple(SHAPES), "colour": tuple(COLOUR_NAMES)}


@torch.no_grad()
def attribute_probe(clip: FrozenCLIP, n_scenes: int = 400, seed: int = 0) -> dict[str, float]:
    """Fraction of val scenes where the true caption beats every single-attribute swap, per attribute."""
    world = ShapesWorld(seed=seed, split="val", length=n_scenes, image_size=clip.geometry.image_size)
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for i in range(n_scenes):
        scene, _ = world.scene(i)
        _, image = clip.image_taps(pil_to_tensor(scene.render(world.image_size))[None], [0])
        k = i % len(scene.objects)
        for attribute, values in ATTRIBUTES.items():
            captions = [_swapped(scene, k, attribute, v).caption(i) for v in values]
            sims = F.cosine_similarity(image, clip.encode_text(clip.tokenize(captions)))
            hits[attribute] += int(sims.argmax()) == values.index(getattr(scene.objects[k], attribute))
    return {attribute: count / n_scenes for attribute, count in hits.items()}


def _swapped(scene: Scene, k: int, attribute: str, value: str) -> Scene:
    objects = list(scene.objects)
    objects[k] = dataclasses.replace(objects[k], **{attribute: value})
    return Scene(objects, scene.background)


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        path = argv[0]
    else:
        from galip.world import shapes_clip_path

        path = shapes_clip_path()
    n_scenes = int(argv[1]) if len(argv) > 1 else 400
    tiny = Path(__file__).parent / "conf" / "clip" / "tiny.yaml"
    clip = load_clip(name=None, model_cfg=yaml.safe_load(tiny.read_text())["model_cfg"], path=path)
    result = attribute_probe(clip, n_scenes)
    chance = ", ".join(f"{a} {1 / len(v):.3f}" for a, v in ATTRIBUTES.items())
    print(
        f"{path}: true caption over single-attribute swaps, {n_scenes} val scenes: "
        + ", ".join(f"{a} {acc:.3f}" for a, acc in result.items())
        + f" (chance {chance})"
    )
    return result


if __name__ == "__main__":
    main()
