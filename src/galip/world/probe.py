"""Does a CLIP see an attribute? Zero-shot probe on real shapes-world scenes.

For each val scene, one object's shape (or colour, or place) is swapped for every other value in the caption;
the probe counts how often the CLIP's image embedding is closest to the true caption (chance: 1/4 for shape,
1/8 for colour, 1/5 to 1/3 for position: only places no other object holds are offered). GALIP's D and its
CLIP loss can only pass on what this CLIP sees.

    python -m galip.world.probe                      # the demo's shapes CLIP (shipped or cached)
    python -m galip.world.probe path/to/clip.pt 400  # another checkpoint of the tiny architecture, N scenes
    python -m galip.world.probe --generator outputs/demo/<time>/generator.safetensors
    python -m galip.world.probe --discriminator outputs/demo/<time>   # the run's trained D, real scenes
    python -m galip.world.probe --patch-visibility [path/to/clip.pt]  # what CLIP's first layer can see
    python -m galip.world.probe --judge-shapes outputs/demo/<time>/generator.safetensors  # what G draws
    python -m galip.world.probe --swap-attack [path/to/clip.pt] [budget]  # can CLIP be fooled invisibly?

With ``--generator``, the images are a trained generator's samples for the scenes' captions instead, probed
by the generator's own frozen CLIP: does that CLIP *believe* G drew the captioned shape? Set beside the
independent judge's shape accuracy on the same kind of samples, a high score here and a chance one there
means G satisfies its CLIP with patterns, not shapes. With ``--discriminator``, a trained D ranks the captions
of real scenes by its logit: a D at chance on shape gives G no reason to draw shapes.

``--patch-visibility`` asks a question before all of these: the ViT's first layer is a linear map of each
p×p×3 pixel patch to ``width`` numbers, so when ``width < 3p²`` it has a null space, and a change of the
pixels inside it reaches nothing downstream — not the taps D reads, not the embedding of the CLIP loss. The
probe reports how much of the pixel change of a single-attribute swap lies in the first layer's row space
(`patch_visibility`); an isotropic random change gets rank / 3p² of it.

``--swap-attack`` asks what G's CLIP term can get away with (`swap_attack`): starting from real one-object
scenes, pixels are moved along CLIP's gradient towards the caption with the shape swapped, within a small L2
budget (below the world's smallest shape change), and the independent judge says which shape it then sees.
A CLIP whose cosine to the swap rises to a real pair's while the judge still sees the old shape can be
satisfied by invisible patterns; a robust CLIP's gradient moves the shape itself.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from galip.clip import FrozenCLIP
from galip.loading import load_module
from galip.sampling import Sampler
from galip.world.artefacts import judge_file, load_shapes_clip
from galip.world.judge import confusion, load_judge
from galip.world.scenes import COLOUR_NAMES, POSITION_NAMES, SHAPES, Scene, ShapesWorld, pil_to_tensor

ATTRIBUTES = {"shape": tuple(SHAPES), "colour": tuple(COLOUR_NAMES)}
# The probe also moves the object to each place no other object holds (chance 1/5 for one object, 1/3 for three).
PROBED = {**ATTRIBUTES, "position": tuple(POSITION_NAMES)}


Score = Callable[[torch.Tensor, list[str]], torch.Tensor]  # ([1, 3, H, W], captions) -> one score each


def clip_score(clip: FrozenCLIP) -> Score:
    """Cosine similarity of the image embedding with each caption's."""

    def score(image: torch.Tensor, captions: list[str]) -> torch.Tensor:
        _, embedding = clip.image_taps(image, [0])
        return F.cosine_similarity(embedding, clip.encode_text(clip.tokenize(captions)))

    return score


def discriminator_score(module) -> Score:
    """A trained GALIP D's logit for the image paired with each caption (real-image input, as in L_D)."""

    def score(image: torch.Tensor, captions: list[str]) -> torch.Tensor:
        x = module.real_taps(image)
        sent = module.clip.encode_text(module.clip.tokenize(captions))
        return module.discriminator(x.expand(len(captions), *x.shape[1:]), sent).flatten()

    return score


@torch.no_grad()
def attribute_probe(
    clip: FrozenCLIP,
    n_scenes: int = 400,
    seed: int = 0,
    images: torch.Tensor | None = None,
    score: Score | None = None,
) -> dict[str, float]:
    """Fraction of val scenes where the true caption beats every single-attribute swap, per attribute.

    ``images``: [n_scenes, 3, H, W] in [-1, 1] to probe instead of the rendered scenes (e.g. samples for
    `val_captions`); row i stands for val scene i. ``score``: what ranks the captions (default
    `clip_score` of ``clip``; `discriminator_score` asks a trained D instead).
    """
    world = ShapesWorld(seed=seed, split="val", length=n_scenes, image_size=probe_size(clip))
    if images is not None and len(images) != n_scenes:
        raise ValueError(f"{len(images)} images for {n_scenes} scenes")
    score = score or clip_score(clip)
    hits = dict.fromkeys(PROBED, 0)
    for i in range(n_scenes):
        scene, _ = world.scene(i)
        image = pil_to_tensor(scene.render(world.image_size)) if images is None else images[i]
        k = i % len(scene.objects)
        for attribute in PROBED:
            values = _candidates(scene, k, attribute)
            scores = score(image[None], [_swapped(scene, k, attribute, v).caption(i) for v in values])
            hits[attribute] += int(scores.argmax()) == values.index(getattr(scene.objects[k], attribute))
    return {attribute: count / n_scenes for attribute, count in hits.items()}


def _candidates(scene: Scene, k: int, attribute: str) -> tuple[str, ...]:
    """The values object k may take in a swap: every value, but for position only the places left free."""
    if attribute != "position":
        return PROBED[attribute]
    taken = {o.position for j, o in enumerate(scene.objects) if j != k}
    return tuple(p for p in POSITION_NAMES if p not in taken)


def probe_size(clip: FrozenCLIP, world_size: int = 64) -> int:
    """The size scenes are rendered at for a probe: CLIP's input size, but at least the world's 64 px, so a
    CLIP that reads a smaller view (conf/clip/shapes_p4_32.yaml) sees the world through its own resize, as
    GALIP shows it real and generated images."""
    return max(clip.geometry.image_size, world_size)


@torch.no_grad()
def patch_visibility(clip: FrozenCLIP, n_scenes: int = 200, seed: int = 0) -> dict[str, float]:
    """Fraction of the (preprocessed) pixel change of a single-attribute swap that CLIP's patch embedding sees.

    For val scene i, object i mod n is given every other value of the attribute (as `attribute_probe`
    swaps it); the change d = x − x_swapped is cut into the first layer's patches and its energy split
    between the row space of that layer's weight (what any later layer can respond to) and its null space.
    Returns one fraction per attribute and ``rank_fraction`` = rank / patch size, what an isotropic random
    change would get. For a CLIP that reads a smaller view than the world, the fractions are of the change
    that survives its resize.
    """
    conv = clip.visual.conv1
    weight = conv.weight.detach().float().flatten(1)  # [width, 3·p·p], in F.unfold's (c, ky, kx) order
    _, sing, vh = torch.linalg.svd(weight, full_matrices=False)
    rank = int((sing > sing.max() * weight.shape[1] * torch.finfo(sing.dtype).eps).sum())
    basis = vh[:rank]  # orthonormal rows spanning the row space
    world = ShapesWorld(seed=seed, split="val", length=n_scenes, image_size=probe_size(clip))

    def patches(image: torch.Tensor) -> torch.Tensor:
        return F.unfold(clip.preprocess(image), conv.kernel_size, stride=conv.stride)  # [1, 3·p·p, L]

    out = {}
    for attribute, values in ATTRIBUTES.items():
        seen = total = 0.0
        for i in range(n_scenes):
            scene, _ = world.scene(i)
            k = i % len(scene.objects)
            x = patches(pil_to_tensor(scene.render(world.image_size))[None])
            for value in values:
                if value == getattr(scene.objects[k], attribute):
                    continue
                swapped = _swapped(scene, k, attribute, value).render(world.image_size)
                d = (x - patches(pil_to_tensor(swapped)[None]))[0]  # [3·p·p, L]
                seen += float((basis @ d).square().sum())
                total += float(d.square().sum())
        out[attribute] = seen / total
    out["rank_fraction"] = rank / weight.shape[1]
    return out


def swap_attack(
    clip: FrozenCLIP,
    judge: torch.nn.Module,
    n_scenes: int = 64,
    budget: float = 3.0,
    steps: int = 30,
    seed: int = 0,
) -> dict[str, float]:
    """Move real one-object val scenes towards their shape-swapped caption along CLIP's gradient; ask the judge.

    Scene i's object gets shape ``SHAPES[(true + 1 + i % 3) % 4]`` in the target caption. ``steps`` normalised
    gradient steps of ``budget / steps`` (L2, in the [-1, 1] pixel scale) ascend the cosine of CLIP's image
    embedding to that caption, pixels kept in [-1, 1]. Returns the mean cosine to the swapped caption before
    and after, to the true caption before (a real pair's level), the mean L2 moved, and the fractions of scenes
    whose object the judge then reads as the target shape / still as the true one.
    """
    world = ShapesWorld(seed=seed, split="val", length=n_scenes, image_size=probe_size(clip), max_objects=1)
    scenes = [world.scene(i)[0] for i in range(n_scenes)]
    true = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
    target = (true + 1 + torch.arange(n_scenes) % 3) % len(SHAPES)
    x0 = torch.stack([pil_to_tensor(s.render(world.image_size)) for s in scenes]).float()
    with torch.no_grad():
        own = F.normalize(
            clip.encode_text(clip.tokenize([s.caption(i) for i, s in enumerate(scenes)])), dim=-1
        )
        swapped = [
            _swapped(s, 0, "shape", SHAPES[t]).caption(i)
            for i, (s, t) in enumerate(zip(scenes, target.tolist(), strict=True))
        ]
        aim = F.normalize(clip.encode_text(clip.tokenize(swapped)), dim=-1)

    def cosine(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(clip.image_taps(image, [0])[1], text)

    x = x0.clone()
    for _ in range(steps if budget > 0 else 0):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(cosine(x, aim).sum(), x)
        step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x = (x.detach() + budget / steps * step).clamp(-1, 1)
    with torch.no_grad():
        seen, before = judge.predict(x)["shape"][:, 0], judge.predict(x0)["shape"][:, 0]
        return {
            "cos_true_before": cosine(x0, own).mean().item(),
            "cos_swap_before": cosine(x0, aim).mean().item(),
            "cos_swap_after": cosine(x, aim).mean().item(),
            "moved_l2": (x - x0).flatten(1).norm(dim=1).mean().item(),
            "judge_sees_swap": (seen == target).float().mean().item(),
            "judge_sees_true": (seen == true).float().mean().item(),
            "judge_true_before": (before == true).float().mean().item(),
        }


def val_captions(n_scenes: int, seed: int = 0) -> list[str]:
    """The captions `attribute_probe` treats as true for its ``n_scenes`` val scenes."""
    world = ShapesWorld(seed=seed, split="val", length=n_scenes)
    return [world.scene(i)[0].caption(i) for i in range(n_scenes)]


def _swapped(scene: Scene, k: int, attribute: str, value: str) -> Scene:
    objects = list(scene.objects)
    objects[k] = dataclasses.replace(objects[k], **{attribute: value})
    return Scene(objects, scene.background)


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--generator"]:
        return probe_generator(argv[1], int(argv[2]) if len(argv) > 2 else 400)
    if argv[:1] == ["--patch-visibility"]:
        path = argv[1] if len(argv) > 1 else None
        clip = load_shapes_clip(path)
        result = patch_visibility(clip)
        print(
            f"{path or 'shapes CLIP'}: share of a swap's pixel change that the patch embedding sees: "
            + ", ".join(f"{a} {v:.3f}" for a, v in result.items() if a != "rank_fraction")
            + f" (an isotropic random change: {result['rank_fraction']:.3f})"
        )
        return result
    if argv[:1] == ["--judge-shapes"]:
        return judge_shapes(argv[1], int(argv[2]) if len(argv) > 2 else 256)
    if argv[:1] == ["--discriminator"]:
        return probe_discriminator(argv[1], int(argv[2]) if len(argv) > 2 else 400)
    if argv[:1] == ["--swap-attack"]:
        path = argv[1] if len(argv) > 1 else None
        budget = float(argv[2]) if len(argv) > 2 else 3.0
        result = swap_attack(load_shapes_clip(path), load_judge(judge_file()).eval(), budget=budget)
        print(
            f"{path or 'shapes CLIP'}: shape-swap attack, L2 budget {budget} (64 one-object val scenes): "
            + json.dumps({k: round(v, 3) for k, v in result.items()})
        )
        return result
    path = argv[0] if argv else None
    n_scenes = int(argv[1]) if len(argv) > 1 else 400
    return _print(path or "shapes CLIP", n_scenes, attribute_probe(load_shapes_clip(path), n_scenes))


def probe_generator(export: str | Path, n_scenes: int = 400, seed: int = 0) -> dict[str, float]:
    """`attribute_probe` of an exported generator's own CLIP on its samples (one per val caption)."""
    sampler = Sampler.from_file(export)
    images = sampler.generate(val_captions(n_scenes), n=1, seed=seed, batch_size=64)
    return _print(f"{export} (samples)", n_scenes, attribute_probe(sampler.clip, n_scenes, images=images))


def probe_discriminator(run_dir: str | Path, n_scenes: int = 400) -> dict[str, float]:
    """`attribute_probe` of a training run's D (``<run>/checkpoints/last.ckpt``) on real val scenes."""
    module = load_module(run_dir)
    score = discriminator_score(module)
    return _print(f"{run_dir} (D)", n_scenes, attribute_probe(module.clip, n_scenes, score=score))


def judge_shapes(export: str | Path, n_scenes: int = 256, seed: int = 0) -> torch.Tensor:
    """The independent judge's shape confusion on G's samples: [captioned shape, shape the judge sees]."""
    world = ShapesWorld(seed=seed, split="val", length=n_scenes)
    samples = [world[i] for i in range(n_scenes)]
    sampler = Sampler.from_file(export)
    images = sampler.generate([s["caption"] for s in samples], n=1, seed=seed, batch_size=64)
    judge = load_judge(judge_file()).eval()
    with torch.no_grad():
        pred = judge.predict(images)["shape"]
    counts = confusion(pred, torch.stack([s["labels"]["shape"] for s in samples]), len(SHAPES))
    accuracy = counts.diagonal().sum() / counts.sum()
    print(f"{export}: judge's shape on G's samples for {n_scenes} val captions, accuracy {accuracy:.3f}")
    print("captioned \\ seen " + " ".join(f"{s:>8}" for s in SHAPES))
    for name, row in zip(SHAPES, counts.tolist(), strict=True):
        print(f"{name:>16} " + " ".join(f"{c:>8}" for c in row))
    return counts


def _print(what, n_scenes: int, result: dict[str, float]) -> dict[str, float]:
    chance = ", ".join(f"{a} {1 / len(v):.3f}" for a, v in ATTRIBUTES.items()) + ", position 0.2-0.33"
    print(
        f"{what}: true caption over single-attribute swaps, {n_scenes} val scenes: "
        + ", ".join(f"{a} {acc:.3f}" for a, acc in result.items())
        + f" (chance {chance})"
    )
    return result


if __name__ == "__main__":
    main()
