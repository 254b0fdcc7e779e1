"""The supervised ceiling of the shapes world: how many steps does a decoder need to draw its shapes?

Not GALIP and not a GAN. A plain conditional CNN decoder is regressed (MSE) to each scene's own rendering, so
it gets the exact target image, which no GAN's generator ever gets. It is conditioned on either

* ``onehot``: the scene's layout as one-hots (for each of the world's places: occupied, shape, colour, size;
  plus the background), the most a caption can say, in the most usable form; or
* ``clip`` (the data preset's CLIP, ``+experiment=<data>_clip`` of `galip.world.pretrain_clip`) or a shapes
  CLIP's ``clip.pt``: its sentence vector of the caption, what GALIP's G is conditioned on; ``--vector``
  scales it: ``unit`` (L2-normalised, the default), ``raw`` (as GALIP's G gets it) or ``standardised`` (each
  dimension to zero mean, unit spread over the training captions).

Every ``--eval-every`` steps the independent judge (the world's, at its image size) scores 256 val captions,
as the demo's callback does (`galip.world.judge.evaluate_generator`). A world qualifies for a demo when this
decoder draws every named attribute (≥ 0.95) within a quarter of the demo's images (experiments/demo.md).

    python -m galip.world.oracle_decoder --data shapes_demo --steps 800 --eval-every 100   # the demo world, one-hots
    python -m galip.world.oracle_decoder --data shapes_demo --condition clip --vector raw  # through its CLIP, as G
    python -m galip.world.oracle_decoder --data shapes_demo --world data.world.jitter=3    # a candidate preset
    python -m galip.world.oracle_decoder --steps 3200 --batch-size 8 --eval-every 800      # the full world at 64 px
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from galip.world.artefacts import data_world, ensure_judge, load_shapes_clip, shapes_clip, world_judge_config
from galip.world.judge import evaluate_generator, load_judge
from galip.world.scenes import FULL_WORLD, ShapesWorld, World

VECTORS = ("unit", "raw", "standardised")
REPORTED = ("acc", "acc_colour", "acc_shape", "acc_size", "acc_position", "acc_background", "fd")


def layout_onehot(labels: dict[str, torch.Tensor], world: World = FULL_WORLD) -> torch.Tensor:
    """A scene's labels (`ShapesWorld` item ``labels``) -> one-hots, one block per place of ``world`` (occupied,
    shape, colour, size) and the background."""
    n_shapes, n_colours = len(world.shapes), len(world.colours)
    places = torch.zeros(len(world.positions), 1 + n_shapes + n_colours + len(world.sizes))
    for slot in range(world.max_objects):
        shape, colour, size, position = (
            int(labels[k][slot]) for k in ("shape", "colour", "size", "position")
        )
        if shape < 0:  # an empty slot
            continue
        offsets = (0, 1 + shape, 1 + n_shapes + colour, 1 + n_shapes + n_colours + size)
        places[position, list(offsets)] = 1.0
    background = F.one_hot(labels["background"].long().reshape(()), len(world.backgrounds)).float()
    return torch.cat([places.flatten(), background])


class ConditionalNorm(nn.Module):
    """BatchNorm without affine, then a scale and shift predicted from the condition (starting at identity)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.affine = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(cond)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class UpBlock(nn.Module):
    """2× nearest upsample, two conditionally normalised 3×3 convs, a 1×1 shortcut."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int):
        super().__init__()
        self.norm1, self.norm2 = ConditionalNorm(c_in, cond_dim), ConditionalNorm(c_out, cond_dim)
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2)
        h = self.conv1(F.relu(self.norm1(x, cond)))
        return self.shortcut(x) + self.conv2(F.relu(self.norm2(h, cond)))


class OracleDecoder(nn.Module):
    """Condition -> MLP -> 4×4 map -> UpBlocks to ``image_size`` -> tanh RGB. Deterministic: no noise."""

    def __init__(self, cond_dim: int, image_size: int = 64, ngf: int = 16):
        super().__init__()
        n_blocks = (image_size // 4).bit_length() - 1
        if 4 * 2**n_blocks != image_size:
            raise ValueError(f"image_size must be 4 times a power of two, got {image_size}")
        chans = [ngf * min(8, 2 ** (n_blocks - i)) for i in range(n_blocks + 1)]
        self.start = chans[0]
        self.fc = nn.Sequential(nn.Linear(cond_dim, 256), nn.ReLU(), nn.Linear(256, chans[0] * 16))
        self.blocks = nn.ModuleList(
            UpBlock(a, b, cond_dim) for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        self.to_rgb = nn.Conv2d(chans[-1], 3, 3, 1, 1)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        x = self.fc(cond).view(-1, self.start, 4, 4)
        for block in self.blocks:
            x = block(x, cond)
        return torch.tanh(self.to_rgb(F.relu(x)))


def _encoder(
    condition: str,
    val_items: list[dict],
    vector: str = "unit",
    train_items: list[dict] = (),
    world: World = FULL_WORLD,
):
    """``(items) -> [N, D]`` for training and ``(captions) -> [B, D]`` for the judge's generate_fn.

    ``vector`` (CLIP conditions only): how the sentence vector is scaled (see the module docstring); the
    ``standardised`` statistics come from ``train_items``' captions."""
    if condition == "onehot":
        by_caption = {it["caption"]: layout_onehot(it["labels"], world) for it in val_items}
        return (
            lambda items: torch.stack([layout_onehot(it["labels"], world) for it in items]),
            lambda captions: torch.stack([by_caption[c] for c in captions]),
        )
    if vector not in VECTORS:
        raise ValueError(f"vector={vector!r}: expected one of {VECTORS}")
    clip = load_shapes_clip(condition)

    def raw(captions: list[str]) -> torch.Tensor:  # encode_text: no grad, fp32, not normalised
        chunks = [captions[i : i + 256] for i in range(0, len(captions), 256)]
        return torch.cat([clip.encode_text(clip.tokenize(c)) for c in chunks])

    shift, scale = 0.0, 1.0
    if vector == "standardised":
        if not train_items:
            raise ValueError("vector='standardised' needs the training items for its statistics")
        reference = raw([it["caption"] for it in train_items])
        shift, scale = reference.mean(0), reference.std(0).clamp_min(1e-6)

    def captions_to_vectors(captions: list[str]) -> torch.Tensor:
        v = raw(captions)
        return F.normalize(v, dim=-1) if vector == "unit" else (v - shift) / scale

    return (lambda items: captions_to_vectors([it["caption"] for it in items])), captions_to_vectors


def run(
    condition: str = "onehot",
    steps: int = 800,
    batch_size: int = 32,
    image_size: int = 64,
    world: World | None = None,
    n_train: int = 6000,
    n_val: int = 256,
    eval_every: int = 200,
    lr: float = 1e-3,
    ngf: int = 16,
    seed: int = 0,
    vector: str = "unit",
    judge=None,
    log=print,
) -> list[dict]:
    """Train the decoder on ``world``'s scenes at ``image_size`` and judge it every ``eval_every`` steps, as the
    demo's callback does (val captions, that world's judge at that size); one dict of metrics per evaluation."""
    torch.manual_seed(seed)
    world = world or FULL_WORLD
    train = ShapesWorld(0, "train", n_train, image_size, world)
    items = [train[i] for i in range(len(train))]
    val = ShapesWorld(0, "val", n_val, image_size, world)
    val_items = [val[i] for i in range(len(val))]
    encode_items, encode_captions = _encoder(condition, val_items, vector, items, world)
    images, conds = torch.stack([it["image"] for it in items]), encode_items(items)
    decoder = OracleDecoder(conds.shape[1], image_size, ngf)
    optimizer = torch.optim.Adam(decoder.parameters(), lr, betas=(0.5, 0.99))
    judge = judge if judge is not None else load_judge(ensure_judge(world_judge_config(world, image_size)))

    @torch.no_grad()
    def generate(captions: list[str], noise: torch.Tensor) -> torch.Tensor:
        decoder.eval()
        out = decoder(encode_captions(captions))
        decoder.train()
        return out

    results, losses, start = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(len(images), (batch_size,))
        loss = F.mse_loss(decoder(conds[index]), images[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            metrics = evaluate_generator(generate, val, judge, n=n_val)
            row = {k: round(metrics[f"judge/{k}"], 3) for k in REPORTED if f"judge/{k}" in metrics}
            mean_loss = sum(losses) / len(losses)  # over the steps since the last evaluation
            row.update(step=step, kimg=round(step * batch_size / 1000, 1), loss=round(mean_loss, 5))
            losses.clear()
            row["seconds"] = round(time.perf_counter() - start)
            results.append(row)
            log(json.dumps(row))
    return results


def markdown(results: list[dict]) -> str:
    head = ["step", "kimg", *REPORTED]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    lines += ["| " + " | ".join(str(r.get(k, "–")) for k in head) + " |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--condition", default="onehot", help="onehot, clip (the data preset's CLIP) or a shapes clip.pt"
    )
    parser.add_argument("--vector", default="unit", choices=VECTORS, help="CLIP vector scaling")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--data", default="shapes", help="the data preset whose world it draws (shapes_demo, …)"
    )
    parser.add_argument(
        "--world", nargs="*", default=[], help="overrides of that preset, e.g. data.world.jitter=2"
    )
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    world, image_size = data_world(args.data, args.world)
    condition = shapes_clip(f"{args.data}_clip") if args.condition == "clip" else args.condition
    results = run(
        condition, args.steps, args.batch_size, image_size, world, args.n_train,
        eval_every=args.eval_every, lr=args.lr, ngf=args.ngf, seed=args.seed, vector=args.vector,
    )  # fmt: skip
    print(f"\n`python -m galip.world.oracle_decoder {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
