"""An independent judge for the embedded shapes world: does a generated image show what its caption says?

The judge is a small CNN trained from scratch on real (rendered) train-split scenes. It shares nothing with
the frozen CLIP inside GALIP — no weights, no architecture, no pre-training — so the generator's CLIP
similarity loss cannot optimise the judge's scores directly.

It reads a scene the way `Scene.labels()` writes it: object *slots* in reading order (left, top, centre,
bottom, right), each with a shape, colour, size and position head, plus a background and an object-count
head. Two metrics come from it:

* **attribute accuracy** against the scene that conditioned the image (see `attribute_accuracy`);
* **judge-FD**: the Fréchet distance between generated and real images in the judge's feature space,
  computed by the framework's FID (`galip.metrics.fid.FrechetDistance`) with the judge as its extractor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from galip.metrics.fid import FrechetDistance
from galip.world.scenes import FULL_WORLD, SLOT_ATTRIBUTES, ShapesWorld, World

# ---------------------------------------------------------------------------------------------------------
# Heads: what each predicts is the world's vocabulary (`World.vocab`; class ids as in `Scene.labels()`)
# ---------------------------------------------------------------------------------------------------------
ATTRIBUTES = SLOT_ATTRIBUTES  # per object slot; judge/acc averages those the world's captions name
VOCAB = FULL_WORLD.vocab()  # the full world's
SCENE_HEADS = ("background", "n_objects")  # one prediction per image
EMPTY = -1  # label of an empty slot; cross-entropy's ignore_index
JUDGE_FORMAT = 1  # bump when the file layout of judge.pt changes


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------
class Judge(nn.Module):
    """Small CNN: image in [-1, 1] -> per-slot attribute logits (and 'features' for the Fréchet distance).

    Any input size is resized (bilinear, antialiased) to ``image_size`` first, so 224 px generator output
    and 64 px world images are judged alike.

    Args:
        image_size: the resolution the network sees (the world renders at 64).
        widths: channels of the conv stages; each stage halves the resolution (max-pooling).
        depth: 3x3 conv + BatchNorm + ReLU layers per stage.
        hidden_dim: width of the hidden layer between the flattened conv map and the features.
        feature_dim: size of the penultimate layer, the feature space of judge-FD.
        slots: object slots (``world.max_objects`` when ``None``).
        world: the `World` (or a mapping of its fields) whose scenes it reads; ``None``: the full world.
    """

    def __init__(
        self,
        image_size: int = 64,
        widths: Sequence[int] = (16, 32, 64, 128),
        feature_dim: int = 128,
        slots: int | None = None,
        depth: int = 1,
        hidden_dim: int = 256,
        world: World | Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.world = World.from_config(world)
        self.vocab = self.world.vocab()
        slots = self.world.max_objects if slots is None else slots
        self.image_size, self.widths, self.depth = image_size, tuple(widths), depth
        self.hidden_dim, self.feature_dim, self.slots = hidden_dim, feature_dim, slots
        stages, in_ch = [], 3
        for out_ch in self.widths:
            stages += [_conv(c, out_ch) for c in (in_ch, *[out_ch] * (depth - 1))] + [nn.MaxPool2d(2)]
            in_ch = out_ch
        self.trunk = nn.Sequential(*stages)
        side = image_size // 2 ** len(self.widths)
        # Two layers on the flattened map: binding objects to reading-order slots is not a linear readout.
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_ch * side * side, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(feature_dim, self.n_outputs(name)) for name in (*ATTRIBUTES, *SCENE_HEADS)}
        )

    def n_outputs(self, head: str) -> int:
        return len(self.vocab[head]) * (self.slots if head in ATTRIBUTES else 1)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "widths": list(self.widths),
            "feature_dim": self.feature_dim,
            "slots": self.slots,
            "depth": self.depth,
            "hidden_dim": self.hidden_dim,
        } | ({} if self.world.is_full else {"world": self.world.as_config()})

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, feature_dim]."""
        return self.embed(self.trunk(self.prepare(images)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: slot heads [B, slots, n_classes], scene heads [B, n_classes]."""
        h = self.features(images)
        out = {}
        for name, head in self.heads.items():
            logits = head(h)
            out[name] = logits.unflatten(1, (self.slots, -1)) if name in ATTRIBUTES else logits
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class ids, shaped like `Scene.labels()` (slot heads [B, slots], scene heads [B])."""
        return {name: logits.argmax(-1) for name, logits in self(images).items()}


def _conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(True)
    )


def judge_loss(logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the heads' cross-entropies; empty slots (label -1) are ignored."""
    return sum(
        F.cross_entropy(logits[name].flatten(0, -2), labels[name].flatten(), ignore_index=EMPTY)
        for name in (*ATTRIBUTES, *SCENE_HEADS)
    )


# ---------------------------------------------------------------------------------------------------------
# Attribute accuracy
# ---------------------------------------------------------------------------------------------------------
def attribute_accuracy(
    pred: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    prefix: str = "judge/",
    attributes: Sequence[str] = ATTRIBUTES,
) -> dict[str, float]:
    """Accuracy of predicted attributes against the scene that conditioned (or rendered) the images.

    Definition: take every non-empty slot of the *target* scenes (slots are objects in reading order, as
    in `Scene.labels()`; a slot is empty where its label is -1). For each attribute a in
    ``attributes`` (those the world's captions name, `World.named`; all four in the full world),
    ``acc_<a>`` is the fraction of those slots whose predicted a is right. Every attribute is scored on the
    same slots, so ``acc`` — their mean — is also the fraction of all (slot, attribute) pairs predicted
    correctly. ``scene_acc`` is the fraction of images in which every
    attribute of every target object is right. Predictions for the target's empty slots are ignored;
    extra objects show up in ``acc_count`` (object count) instead. ``acc_background`` is reported too.

    Args:
        pred, target: dicts of class ids; slot attributes [B, slots], ``background``/``n_objects`` [B]
            (optional).
    """
    present = target["shape"] != EMPTY
    if not present.any():
        raise ValueError("the target scenes have no objects")
    right = {a: (pred[a] == target[a]) | ~present for a in attributes}  # empty slots count as right here
    order = [a for a in ("colour", "shape", "size", "position") if a in attributes]
    out = {f"{prefix}acc_{a}": _fraction(right[a] & present, present) for a in order}
    out[f"{prefix}acc"] = sum(out[f"{prefix}acc_{a}"] for a in attributes) / len(attributes)
    out[f"{prefix}scene_acc"] = torch.stack(list(right.values())).all(0).all(-1).float().mean().item()
    for name, key in (("background", "acc_background"), ("n_objects", "acc_count")):
        if name in pred and name in target:
            out[f"{prefix}{key}"] = (pred[name] == target[name]).float().mean().item()
    return out


def confusion(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Counts [target class, predicted class] over the non-empty target slots of a slot attribute."""
    present = target != EMPTY
    flat = target[present] * n_classes + pred[present]
    return torch.bincount(flat, minlength=n_classes * n_classes).view(n_classes, n_classes)


def _fraction(hits: torch.Tensor, mask: torch.Tensor) -> float:
    return (hits.sum() / mask.sum()).item()


# ---------------------------------------------------------------------------------------------------------
# Judge-FD: torchmetrics' Fréchet distance with the judge as the feature extractor
# ---------------------------------------------------------------------------------------------------------
class JudgeFeatures(nn.Module):
    """`Judge.features` as an FID extractor: uint8 images (as the FID metric feeds them) -> [B, F], always eval."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.feature_dim
        self.train(False)

    def train(self, mode: bool = True) -> JudgeFeatures:
        return super().train(False)  # BatchNorm must keep its running statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(to_unit_range(images))


def fid_features(path: str | Path) -> JudgeFeatures:
    """The judge of ``path`` as an FID extractor (``metrics.fid.extractor=judge``)."""
    return JudgeFeatures(load_judge(path))


def judge_fd(judge: Judge) -> FrechetDistance:
    """Judge-FD: the framework's FID with the judge as its feature extractor (images quantised to 8 bits like
    a saved PNG, as every FID here; the world's real renders are 8-bit already)."""
    return FrechetDistance(JudgeFeatures(judge), extractor="judge", reset_real_features=True)


# ---------------------------------------------------------------------------------------------------------
# Rendering the world into tensors
# ---------------------------------------------------------------------------------------------------------
def render_split(world: ShapesWorld, n: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The first ``n`` scenes of ``world`` as uint8 images [n, 3, S, S] and stacked labels."""
    n = len(world) if n is None else n
    images = np.empty((n, world.image_size, world.image_size, 3), dtype=np.uint8)
    labels: dict[str, list] = {name: [] for name in world.world.vocab()}
    for i in range(n):
        scene, _ = world.scene(i)
        images[i] = np.asarray(scene.render(world.image_size))
        for name, value in scene.labels().items():
            labels[name].append(value)
    stacked = {name: torch.tensor(values, dtype=torch.long) for name, values in labels.items()}
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), stacked


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the world's `pil_to_tensor` convention)."""
    return images.float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
DEFAULT_TRAIN_CONFIG: dict[str, Any] = {
    "seed": 0,  # world seed and training seed
    "image_size": 64,
    "n_train": 12_000,  # distinct train scenes, rendered once
    "n_val": 1000,
    "steps": 1600,
    "batch_size": 64,
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "noise_std": 0.08,  # max std of additive pixel noise (augmentation)
    "max_shift": 2,  # max translation in pixels (augmentation); positions are ~20 px apart
    "widths": [16, 32, 64, 128],
    "depth": 1,
    "hidden_dim": 256,
    "feature_dim": 128,
}


def train_judge(
    config: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = print, **overrides: Any
) -> tuple[Judge, dict[str, float]]:
    """Train a judge on the train split (rendered in memory); return it and its metrics on the val split.

    ``config`` overrides `DEFAULT_TRAIN_CONFIG` (and keyword arguments override both). Augmentation: a small
    random translation and additive pixel noise, so the judge does not hinge on perfectly clean pixels.
    """
    cfg = {**DEFAULT_TRAIN_CONFIG, **(config or {}), **overrides}
    log = log or (lambda _: None)
    torch.manual_seed(cfg["seed"])
    start = time.perf_counter()
    world = World.from_config(cfg.get("world"))
    images, labels = render_split(ShapesWorld(cfg["seed"], "train", cfg["n_train"], cfg["image_size"], world))
    log(f"judge: rendered {len(images)} train scenes in {time.perf_counter() - start:.1f}s")
    judge = Judge(
        cfg["image_size"],
        cfg["widths"],
        cfg["feature_dim"],
        depth=cfg["depth"],
        hidden_dim=cfg["hidden_dim"],
        world=world,
    )
    _fit(judge, images, labels, cfg, log)
    world_val = ShapesWorld(cfg["seed"], "val", cfg["n_val"], cfg["image_size"], world)
    metrics = evaluate_judge(judge, world_val, batch_size=256)
    metrics["judge/train_seconds"] = time.perf_counter() - start
    log("judge: val " + " ".join(f"{k.removeprefix('judge/')}={v:.4f}" for k, v in metrics.items()))
    return judge, metrics


def _fit(judge: Judge, images: torch.Tensor, labels: dict, cfg: Mapping[str, Any], log: Callable) -> None:
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["lr"], total_steps=cfg["steps"], pct_start=0.15
    )
    gen = torch.Generator().manual_seed(cfg["seed"])
    judge.train()
    order, cursor = torch.randperm(len(images), generator=gen), 0
    for step in range(cfg["steps"]):
        if cursor + cfg["batch_size"] > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        idx = order[cursor : cursor + cfg["batch_size"]]
        cursor += cfg["batch_size"]
        x = augment(to_unit_range(images[idx]), gen, cfg["noise_std"], cfg["max_shift"])
        loss = judge_loss(judge(x), {k: v[idx] for k, v in labels.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, cfg["steps"] // 10) == 0:
            log(f"judge: step {step + 1}/{cfg['steps']} loss {loss.item():.4f}")
    judge.eval()


def augment(x: torch.Tensor, gen: torch.Generator, noise_std: float, max_shift: int) -> torch.Tensor:
    """Per-image random translation (edge-replicated) and additive Gaussian noise of random strength."""
    if max_shift:
        b, _, h, w = x.shape
        padded = F.pad(x, (max_shift,) * 4, mode="replicate")
        dx, dy = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if noise_std:
        std = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * noise_std
        x = x + std * torch.randn(x.shape, generator=gen)
    return x


@torch.no_grad()
def evaluate_judge(judge: Judge, world: ShapesWorld, batch_size: int = 256) -> dict[str, float]:
    """The judge's own accuracy on real images of ``world`` (its val split, normally)."""
    images, labels = render_split(world)
    device = _device(judge)
    was_training = judge.training
    judge.eval()
    try:
        preds = [judge.predict(to_unit_range(chunk).to(device)) for chunk in images.split(batch_size)]
    finally:
        judge.train(was_training)
    return attribute_accuracy(_cat(preds), labels, attributes=world.world.named)


def _cat(chunks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([c[k].cpu() for c in chunks]) for k in chunks[0]}


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def save_judge(
    path: str | Path,
    judge: Judge,
    metrics: Mapping[str, float] | None = None,
    train_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``judge.pt``: weights, architecture, vocabulary, training config and val metrics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": JUDGE_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in judge.state_dict().items()},
        "config": judge.config,
        "vocab": {k: list(v) for k, v in judge.vocab.items()},
        "train_config": dict(train_config or {}),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # a half-written file is never mistaken for a cached judge
    return path


def load_judge(path: str | Path, map_location: str | torch.device = "cpu") -> Judge:
    """Load a judge written by `save_judge` (weights-only unpickling), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no judge at {path}: train one with `python -m galip.world.train_judge` (or `ensure_judge()`)"
        )
    payload = torch.load(path, map_location=map_location, weights_only=True)
    judge = Judge(**payload["config"])
    vocab = {k: tuple(v) for k, v in payload["vocab"].items()}
    if vocab != judge.vocab:
        raise ValueError(f"judge at {path}: its vocabulary {vocab} is not its world's {judge.vocab}")
    judge.load_state_dict(payload["state_dict"])
    judge.metrics = dict(payload.get("metrics", {}))
    return judge.eval()


# ---------------------------------------------------------------------------------------------------------
# Scoring a generator
# ---------------------------------------------------------------------------------------------------------
GenerateFn = Callable[[Sequence[str], torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate_generator(
    generate_fn: GenerateFn,
    world_val: ShapesWorld,
    judge: Judge,
    n: int = 512,
    batch_size: int = 64,
    seed: int = 0,
    nz: int = 100,
) -> dict[str, float]:
    """Judge a generator on the first ``n`` scenes of ``world_val``.

    Each scene's caption (the world's own choice of template) conditions one image, with noise drawn from
    ``seed`` (so the result is deterministic for a seed and a deterministic generator). Returns
    `attribute_accuracy` against those scenes' labels and ``judge/fd``: judge-FD between the generated
    images and the real renderings of the same scenes.

    Args:
        generate_fn: ``(captions, noise [B, nz]) -> images [B, 3, H, W]`` in [-1, 1], e.g.
            ``GALIPModule.generate``.
        nz: noise size the generator expects.
    """
    n = min(n, len(world_val))
    if n < 2:
        raise ValueError("judge-FD needs at least 2 samples")
    device = _device(judge)
    judge.eval()
    fd = judge_fd(judge).to(device)
    noise = torch.randn(n, nz, generator=torch.Generator().manual_seed(seed))
    preds, targets = [], []
    for start in range(0, n, batch_size):
        samples = [world_val[i] for i in range(start, min(start + batch_size, n))]
        fake = generate_fn([s["caption"] for s in samples], noise[start : start + len(samples)])
        fake = fake.to(device=device, dtype=torch.float32)
        fd.update(torch.stack([s["image"] for s in samples]).to(device), real=True)
        fd.update(fake, real=False)
        preds.append(judge.predict(fake))
        targets.append({k: torch.stack([s["labels"][k] for s in samples]) for k in judge.vocab})
    metrics = attribute_accuracy(_cat(preds), _cat(targets), attributes=judge.world.named)
    metrics["judge/fd"] = float(fd.compute())
    metrics["judge/n"] = float(n)
    return metrics
