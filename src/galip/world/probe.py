"""Does a CLIP see an attribute? Zero-shot probe on real shapes-world scenes.

For each val scene, one object's shape (or colour, or place) is swapped for every other value in the caption;
the probe counts how often the CLIP's image embedding is closest to the true caption (chance: 1/4 for shape,
1/8 for colour, 1/5 to 1/3 for position: only places no other object holds are offered). GALIP's D and its
CLIP loss can only pass on what this CLIP sees.

    python -m galip.world.probe                      # the full world's shapes CLIP (shipped or cached)
    python -m galip.world.probe --data shapes_demo   # the demo world and its CLIP
    python -m galip.world.probe path/to/clip.pt 400  # another checkpoint of the tiny architecture, N scenes
    python -m galip.world.probe --data shapes_demo --generator outputs/demo/<time>/generator.safetensors
    python -m galip.world.probe --discriminator outputs/demo/<time>   # the run's trained D, real scenes
    python -m galip.world.probe --judge-shapes outputs/demo/<time>/generator.safetensors  # what G draws
    (each with ``--data shapes_demo`` for the demo world's scenes, judge and CLIP; the default is the full world)

With ``--generator``, the images are a trained generator's samples for the scenes' captions instead, probed
by the generator's own frozen CLIP: does that CLIP *believe* G drew the captioned shape? Set beside the
independent judge's shape accuracy on the same kind of samples, a high score here and a chance one there
means G satisfies its CLIP with patterns, not shapes. With ``--discriminator``, a trained D ranks the captions
of real scenes by its logit: a D at chance on shape gives G no reason to draw shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from galip.clip import FrozenCLIP
from galip.loading import load_module
from galip.sampling import Sampler
from galip.world.artefacts import data_world, judge_file, load_shapes_clip, shapes_clip
from galip.world.judge import confusion, load_judge
from galip.world.scenes import FULL_WORLD, Scene, ShapesWorld, World, pil_to_tensor


def probed(world: World = FULL_WORLD) -> dict[str, tuple[str, ...]]:
    """The attributes the probe swaps (those the world's captions name) and their values; the probe moves an
    object only to places no other object holds (chance 1/5 for one object, 1/3 for three)."""
    vocab = world.vocab()
    return {a: vocab[a] for a in ("shape", "colour", "size", "position") if a in world.named}


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
    world: World | None = None,
    image_size: int = 64,
) -> dict[str, float]:
    """Fraction of val scenes of ``world`` (default: the full one) where the true caption beats every
    single-attribute swap, per attribute its captions name.

    ``images``: [n_scenes, 3, H, W] in [-1, 1] to probe instead of the rendered scenes (e.g. samples for
    `val_captions`); row i stands for val scene i. ``score``: what ranks the captions (default
    `clip_score` of ``clip``; `discriminator_score` asks a trained D instead). ``image_size``: the world's
    (its data preset's) image size; scenes render at it, or at CLIP's input size if that is larger.
    """
    world = ShapesWorld(seed, "val", n_scenes, probe_size(clip, image_size), world)
    if images is not None and len(images) != n_scenes:
        raise ValueError(f"{len(images)} images for {n_scenes} scenes")
    score = score or clip_score(clip)
    attributes = probed(world.world)
    hits = dict.fromkeys(attributes, 0)
    for i in range(n_scenes):
        scene, _ = world.scene(i)
        image = pil_to_tensor(scene.render(world.image_size)) if images is None else images[i]
        k = i % len(scene.objects)
        for attribute in attributes:
            values = _candidates(scene, k, attribute)
            scores = score(image[None], [_swapped(scene, k, attribute, v).caption(i) for v in values])
            hits[attribute] += int(scores.argmax()) == values.index(getattr(scene.objects[k], attribute))
    return {attribute: count / n_scenes for attribute, count in hits.items()}


def _candidates(scene: Scene, k: int, attribute: str) -> tuple[str, ...]:
    """The values object k may take in a swap: every value, but for position only the places left free."""
    values = scene.world.vocab()[attribute]
    if attribute != "position":
        return values
    taken = {o.position for j, o in enumerate(scene.objects) if j != k}
    return tuple(p for p in values if p not in taken)


def probe_size(clip: FrozenCLIP, world_size: int = 64) -> int:
    """The size scenes are rendered at for a probe: CLIP's input size, but at least the world's (64 px for
    the full world, 32 for the demo's), so a CLIP that reads a smaller view sees the world through its own
    resize, as GALIP shows it real and generated images."""
    return max(clip.geometry.image_size, world_size)


def val_captions(n_scenes: int, seed: int = 0, world: World | None = None) -> list[str]:
    """The captions `attribute_probe` treats as true for its ``n_scenes`` val scenes."""
    world = ShapesWorld(seed=seed, split="val", length=n_scenes, world=world)
    return [world.scene(i)[0].caption(i) for i in range(n_scenes)]


def _swapped(scene: Scene, k: int, attribute: str, value: str) -> Scene:
    objects = list(scene.objects)
    objects[k] = dataclasses.replace(objects[k], **{attribute: value})
    return Scene(objects, scene.background, scene.world)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m galip.world.probe",
        description="Zero-shot attribute probe of a shapes CLIP, a generator's samples or a trained D.",
    )
    parser.add_argument(
        "clip", nargs="?", help="a shapes CLIP file (default: the data preset's, shipped or cached)"
    )
    parser.add_argument("n", nargs="?", type=int, help="val scenes (default 400; 256 with --judge-shapes)")
    parser.add_argument(
        "--data", help="the data preset whose world it probes (shapes_demo, …; default: shapes)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--generator", metavar="EXPORT", help="probe G's samples with G's own CLIP")
    mode.add_argument("--judge-shapes", metavar="EXPORT", help="the judge's shape confusion on G's samples")
    mode.add_argument("--discriminator", metavar="RUN", help="a training run's D on real scenes")
    args, rest = parser.parse_known_args(argv)
    subject = args.generator or args.judge_shapes or args.discriminator
    if (
        subject is not None and args.clip is not None
    ):  # `--generator EXPORT 400`: the count follows the subject
        if args.n is not None or not args.clip.isdigit():
            parser.error(f"unexpected argument {args.clip!r} (a count of scenes is an integer)")
        args.clip, args.n = None, int(args.clip)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float] | torch.Tensor:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as err:  # a missing CLIP file, export or run: one line
        print(f"galip: {err}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace) -> dict[str, float] | torch.Tensor:
    world, image_size = data_world(args.data) if args.data else (FULL_WORLD, 64)
    place = {"world": world, "image_size": image_size}
    if args.generator:
        return probe_generator(args.generator, args.n or 400, **place)
    if args.judge_shapes:
        return judge_shapes(args.judge_shapes, args.n or 256, **place)
    if args.discriminator:
        return probe_discriminator(args.discriminator, args.n or 400, **place)
    path = args.clip or (shapes_clip(f"{args.data}_clip") if args.data else None)
    n_scenes = args.n or 400
    result = attribute_probe(load_shapes_clip(path), n_scenes, **place)
    return _print(path or "shapes CLIP", n_scenes, result, world)


def probe_generator(
    export: str | Path, n_scenes: int = 400, seed: int = 0, world: World = FULL_WORLD, image_size: int = 64
) -> dict[str, float]:
    """`attribute_probe` of an exported generator's own CLIP on its samples (one per val caption)."""
    sampler = Sampler.from_file(export)
    images = sampler.generate(val_captions(n_scenes, world=world), n=1, seed=seed, batch_size=64)
    result = attribute_probe(sampler.clip, n_scenes, images=images, world=world, image_size=image_size)
    return _print(f"{export} (samples)", n_scenes, result, world)


def probe_discriminator(
    run_dir: str | Path, n_scenes: int = 400, world: World = FULL_WORLD, image_size: int = 64
) -> dict[str, float]:
    """`attribute_probe` of a training run's D (``<run>/checkpoints/last.ckpt``) on real val scenes."""
    module = load_module(run_dir)
    score = discriminator_score(module)
    result = attribute_probe(module.clip, n_scenes, score=score, world=world, image_size=image_size)
    return _print(f"{run_dir} (D)", n_scenes, result, world)


def judge_shapes(
    export: str | Path, n_scenes: int = 256, seed: int = 0, world: World = FULL_WORLD, image_size: int = 64
) -> torch.Tensor:
    """The independent judge's shape confusion on G's samples: [captioned shape, shape the judge sees]."""
    scenes = ShapesWorld(seed, "val", n_scenes, image_size, world)
    samples = [scenes[i] for i in range(n_scenes)]
    sampler = Sampler.from_file(export)
    images = sampler.generate([s["caption"] for s in samples], n=1, seed=seed, batch_size=64)
    judge = load_judge(judge_file(world, image_size)).eval()
    with torch.no_grad():
        pred = judge.predict(images)["shape"]
    shapes = world.shapes
    counts = confusion(pred, torch.stack([s["labels"]["shape"] for s in samples]), len(shapes))
    accuracy = counts.diagonal().sum() / counts.sum()
    print(f"{export}: judge's shape on G's samples for {n_scenes} val captions, accuracy {accuracy:.3f}")
    print("captioned \\ seen " + " ".join(f"{s:>8}" for s in shapes))
    for name, row in zip(shapes, counts.tolist(), strict=True):
        print(f"{name:>16} " + " ".join(f"{c:>8}" for c in row))
    return counts


def _print(what, n_scenes: int, result: dict[str, float], world: World = FULL_WORLD) -> dict[str, float]:
    chance = ", ".join(
        f"{a} {1 / len(v):.3f}" if a != "position" else "position 0.2-0.33" for a, v in probed(world).items()
    )
    print(
        f"{what}: true caption over single-attribute swaps, {n_scenes} val scenes: "
        + ", ".join(f"{a} {acc:.3f}" for a, acc in result.items())
        + f" (chance {chance})"
    )
    return result


if __name__ == "__main__":
    main()
