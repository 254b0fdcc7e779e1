"""The shapes world's own tiny CLIP, pretrained contrastively (``python -m galip.world.pretrain_clip``).

No CLIP weights can be downloaded everywhere, so the embedded world brings its own: a small open_clip
``CLIP`` trained contrastively with open_clip's ``ClipLoss`` on captioned scenes. The product is an artefact
in the cache (``galip.world.cache``), keyed by the settings that determine the weights::

    <cache>/clip/<key>/clip.pt        plain open_clip state dict (fp16 tensors; loads as fp32)
                       metrics.json   zero-shot val retrieval top-1, image->text and text->image, at B pairs
                       config.json    the settings the key hashes

A copy shipped in ``galip/world/assets/clip/<key>/`` with the same key is found first (``galip.world.cache``).
``galip.clip.load_clip(name=None, model_cfg=<the architecture>, path=.../clip.pt)`` loads it;
`ensure_shapes_clip` returns the path, training first if the artefact is missing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import open_clip
import torch
import torch.nn.functional as F
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobRuntime
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from galip.clip import model_config, resize_square
from galip.config import normalize_slot_overrides
from galip.quiet import silence_library_noise
from galip.world.cache import SHIPPED_ROOT, artefact_dir, config_key, write_config
from galip.world.scenes import SHAPES, World, shape_swaps

log = logging.getLogger("galip.world.tiny_clip")

CONFIG_DIR = Path(__file__).parent / "conf" / "pretrain"
DEFAULT_EXPERIMENT = "shapes_clip"
# Bump when the training code changes what the same config produces, so old artefacts are not reused.
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Zero-shot retrieval
# ---------------------------------------------------------------------------------------------------------
def retrieval_top1(
    image_features: torch.Tensor, text_features: torch.Tensor, scene: torch.Tensor, batch_size: int
) -> dict[str, float]:
    """Top-1 retrieval within consecutive groups of ``batch_size`` (image, caption) pairs; chance = 1/B.

    ``i2t``: each image picks the most similar of the group's B captions; ``t2i`` the reverse. A pick is
    right when it shows the same scene (``scene`` ids), since a group can draw one scene twice; ``*_strict``
    demands the pair's own index. The last, incomplete group is left out.
    """
    n_groups = image_features.shape[0] // batch_size
    if n_groups == 0:
        raise ValueError(f"retrieval needs at least {batch_size} val pairs, got {image_features.shape[0]}")
    n = n_groups * batch_size
    img = image_features[:n].view(n_groups, batch_size, -1)
    txt = text_features[:n].view(n_groups, batch_size, -1)
    same = scene[:n].view(n_groups, batch_size, 1) == scene[:n].view(n_groups, 1, batch_size)
    sim = img @ txt.transpose(1, 2)  # [group, image, text]
    i2t, t2i = sim.argmax(2, keepdim=True), sim.argmax(1, keepdim=True)
    own = torch.arange(batch_size, device=sim.device)
    return {
        "i2t_top1": same.gather(2, i2t).float().mean().item(),
        "t2i_top1": same.gather(1, t2i).float().mean().item(),
        "i2t_top1_strict": (i2t.squeeze(2) == own).float().mean().item(),
        "t2i_top1_strict": (t2i.squeeze(1) == own).float().mean().item(),
        "retrieval_batch": batch_size,
        "chance": 1.0 / batch_size,
        "n_pairs": n,
    }


def scene_ids(batch: Mapping[str, Any]) -> torch.Tensor:
    """Per-sample rows of the shapes world's labels (equal rows <=> identical scenes); index rows otherwise."""
    labels = batch.get("labels")
    if labels is None:
        return torch.arange(batch["image"].shape[0]).view(-1, 1)
    return torch.cat([labels[k].view(labels[k].shape[0], -1) for k in sorted(labels)], dim=1)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class ContrastiveCLIP(L.LightningModule):
    """An open_clip ``CLIP`` trained with ``ClipLoss`` (learnable temperature, clamped as in open_clip).

    Images arrive in [-1, 1] and are normalised exactly as `galip.clip.FrozenCLIP.preprocess` does, so the
    frozen model that later loads these weights sees what this one was trained on.
    """

    def __init__(
        self,
        model_cfg: Mapping[str, Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        total_steps: int = 1000,
        min_lr_ratio: float = 0.0,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        retrieval_batch: int = 64,
        status_every: int = 0,
        shape_negatives_weight: float = 0.0,
        shapes: Sequence[str] = SHAPES,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = open_clip.CLIP(**model_config(model_cfg=model_cfg), output_dict=True)
        with torch.no_grad():
            self.model.logit_scale.fill_(init_logit_scale)
        self.loss = open_clip.loss.ClipLoss()
        visual = self.model.visual
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.retrieval: dict[str, float] = {}
        self._started = 0.0

    # -- forward ----------------------------------------------------------------------------------------
    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> CLIP-normalised input at CLIP's input size, resized as `FrozenCLIP.preprocess`
        does by default (antialiased bilinear), so a CLIP that reads 32 px of a 64-px world is trained on what
        GALIP will show it."""
        x = resize_square((image + 1) * 0.5, self.model.visual.image_size[0])
        return (x - self.mean) / self.std

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised image and text features and the logit scale (open_clip's output dict)."""
        return self.model(self.pixels(image), tokens)

    # -- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch["image"], batch["tokens"])
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        if self.hparams.shape_negatives_weight:
            hard = self.shape_negatives_loss(batch, out, batch_idx)
            self.log("train/shape_negatives", hard, batch_size=len(batch["caption"]))
            loss = loss + self.hparams.shape_negatives_weight * hard
        with torch.no_grad():
            sim = out["image_features"] @ out["text_features"].T
            own = torch.arange(sim.shape[0], device=sim.device)
            acc = (sim.argmax(1) == own).float().mean()
        self.log_dict(
            {"train/loss": loss, "train/i2t_top1": acc, "train/logit_scale": out["logit_scale"]},
            batch_size=sim.shape[0],
        )
        return loss

    def shape_negatives_loss(
        self, batch: dict[str, Any], out: dict[str, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """Cross-entropy of each image over its own caption and that caption's `shape_swaps` (label 0)."""
        rng = random.Random(batch_idx)  # which shape word is swapped: fixed per step, so reruns agree
        shapes = self.hparams.shapes
        return self.caption_negatives_loss(out, [shape_swaps(c, rng, shapes) for c in batch["caption"]])

    def caption_negatives_loss(
        self, out: dict[str, torch.Tensor], negatives: list[list[str]]
    ) -> torch.Tensor:
        """Mean over the images with negatives of CE(image vs [own caption, *its negatives]), label 0.

        Images may have different numbers of negatives: missing ones are masked out of the softmax."""
        keep = [i for i, n in enumerate(negatives) if n]
        if not keep:
            return out["logit_scale"] * 0.0
        flat = [c for i in keep for c in negatives[i]]
        text = F.normalize(self.model.encode_text(self.tokenizer(flat).to(self.device)), dim=-1)
        counts = torch.tensor([len(negatives[i]) for i in keep], device=self.device)
        valid = torch.arange(int(counts.max()), device=self.device) < counts[:, None]  # [rows, widest]
        index = torch.zeros(valid.shape, dtype=torch.long, device=self.device)
        index[valid] = torch.arange(len(flat), device=self.device)  # row-major: the order of `flat`
        img, own = out["image_features"][keep], out["text_features"][keep]
        sims = torch.cat([(img * own).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", img, text[index])], 1)
        # mask after scaling: a -inf inside the product would give the logit scale a 0·inf = NaN gradient
        mask = torch.cat([valid.new_ones(len(keep), 1), valid], dim=1)
        logits = (out["logit_scale"] * sims).masked_fill(~mask, float("-inf"))
        return F.cross_entropy(logits, torch.zeros(len(keep), dtype=torch.long, device=self.device))

    @property
    def tokenizer(self):
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = open_clip.SimpleTokenizer(context_length=self.model.context_length)
        return self._tokenizer

    def on_train_start(self) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        with torch.no_grad():  # open_clip's clamp: keeps the temperature from running away
            self.model.logit_scale.clamp_(0, math.log(self.hparams.max_logit_scale))
        step, every = self.global_step, self.hparams.status_every
        if every and self.trainer.is_global_zero and (step % every == 0 or step == self.trainer.max_steps):
            self.print_status(outputs, batch)

    def print_status(self, outputs: Any, batch: dict[str, Any]) -> None:
        metrics, n = self.trainer.callback_metrics, batch["image"].shape[0]
        print(
            f"step {self.global_step:5d}/{self.trainer.max_steps}  kimg {self.global_step * n / 1000:6.1f}  "
            f"loss {float(outputs['loss']):.3f}  train i2t@{n} {float(metrics['train/i2t_top1']):.2f}  "
            f"scale {self.model.logit_scale.exp().item():5.1f}  lr {self.lr_schedulers().get_last_lr()[0]:.2e}  "
            f"{time.perf_counter() - self._started:6.1f} s",
            flush=True,
        )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps
        )
        schedule = warmup_cosine(hp.warmup_steps, hp.total_steps, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation: zero-shot retrieval ------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch["image"], batch["tokens"])
        self._val.append((out["image_features"], out["text_features"], scene_ids(batch).to(self.device)))

    def on_validation_epoch_end(self) -> None:
        img, txt, rows = (torch.cat(parts) for parts in zip(*self._val, strict=True))
        scene = torch.unique(rows, dim=0, return_inverse=True)[1]
        self.retrieval = retrieval_top1(img, txt, scene, self.hparams.retrieval_batch)
        self.retrieval["logit_scale"] = self.model.logit_scale.exp().item()
        self.log_dict({f"val/{k}": float(v) for k, v in self.retrieval.items()})
        self._val = []


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's split: no decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LR multiplier: linear warmup to 1, then cosine down to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def round_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round floating weights to ``dtype`` in place (kept fp32): evaluation then describes the saved file."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(dtype))


# ---------------------------------------------------------------------------------------------------------
# Training run and artefact
# ---------------------------------------------------------------------------------------------------------
def architecture(cfg: DictConfig) -> dict:
    """The open_clip architecture dict selected by the ``clip`` group (tiny by default)."""
    return model_config(cfg.clip.get("name"), cfg.clip.get("model_cfg"))


def n_train(cfg: DictConfig) -> int:
    return int(cfg.data.n_train or cfg.optim.steps * cfg.data.batch_size)


def artefact_config(cfg: DictConfig) -> dict[str, Any]:
    """What determines the weights, hence the cache key (workers, threads, logging and eval are left out)."""
    data = cfg.data
    return {
        "format": FORMAT_VERSION,
        "model_cfg": architecture(cfg),
        "data": {"image_size": data.image_size, "batch_size": data.batch_size, "n_train": n_train(cfg)}
        | _world_key(cfg),
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "loss": _loss_key(cfg),
        "seed": cfg.seed,
        "data_seed": data.seed,
        "precision": str(cfg.trainer.precision),
        "save_dtype": cfg.cache.save_dtype,
    }


def _world_key(cfg: DictConfig) -> dict[str, Any]:
    """``{"world": …}`` for a world other than the full one; nothing for the full world (earlier keys hold)."""
    key = World.from_config(cfg.data.get("world")).key()
    return {} if key is None else {"world": key}


def _loss_key(cfg: DictConfig) -> dict[str, Any]:
    """The loss settings; an unused hard-negative term is left out, so keys made before it existed still hold."""
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    optional = ("shape_negatives_weight",)
    for unused in [k for k in optional if not loss.get(k)]:
        loss.pop(unused, None)
    return loss


def build_module(cfg: DictConfig) -> ContrastiveCLIP:
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    return ContrastiveCLIP(
        architecture(cfg),
        total_steps=optim.pop("steps"),
        **optim,
        **cfg.loss,
        retrieval_batch=cfg.eval.retrieval_batch,
        shapes=World.from_config(cfg.data.get("world")).shapes,
        status_every=cfg.get("status_every") or 0,
    )


def pretrain(cfg: DictConfig) -> tuple[ContrastiveCLIP, dict[str, float]]:
    """seed -> data, model -> Trainer -> fit -> round to the storage dtype -> val retrieval."""
    silence_library_noise()
    if cfg.get("num_threads"):
        torch.set_num_threads(cfg.num_threads)
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=module.model.context_length)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, n_train=n_train(cfg))
    trainer: L.Trainer = instantiate(cfg.trainer)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.info(
        "pretraining CLIP: %s trainable parameters, %d steps of %d",
        f"{trainable:,}",
        cfg.optim.steps,
        cfg.data.batch_size,
    )
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    train_seconds = time.perf_counter() - started
    if trainer.interrupted or trainer.global_step < cfg.optim.steps:  # e.g. SIGTERM: Lightning stops early
        raise RuntimeError(
            f"pretraining stopped at step {trainer.global_step} of {cfg.optim.steps}; nothing saved"
        )
    round_weights(module.model, getattr(torch, cfg.cache.save_dtype))
    trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    return module, {
        **module.retrieval,
        "steps": trainer.global_step,
        "train_seconds": round(train_seconds, 1),
    }


def save_artefact(
    directory: Path, model: torch.nn.Module, metrics: Mapping, config: Mapping, dtype: str
) -> Path:
    """config.json, metrics.json, then clip.pt (written last and atomically: its presence means complete)."""
    write_config(directory, config)
    (directory / "metrics.json").write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))
    to = getattr(torch, dtype)
    state = {k: v.detach().to(to) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path, tmp = directory / "clip.pt", directory / f"clip.pt.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def ensure(cfg: DictConfig, logs_beside: bool = False) -> Path:
    """The checkpoint for ``cfg`` (shipped or cached), trained and saved first if missing (or ``cache.force``).

    A new artefact always goes to the cache, never over a shipped copy. ``logs_beside``: Lightning's logs go
    to ``<artefact>/run`` (for calls from outside a Hydra run, which has no output directory).
    """
    config = artefact_config(cfg)
    found = artefact_dir("clip", config, root=cfg.paths.cache_dir) / "clip.pt"
    if found.is_file() and not cfg.cache.force:
        report(found, "found")
        return found
    directory = Path(cfg.paths.cache_dir) / "clip" / config_key(config)
    if logs_beside:
        OmegaConf.update(cfg, "paths.output_dir", str(directory / "run"))
    module, metrics = pretrain(cfg)
    path = save_artefact(directory, module.model, metrics, config, cfg.cache.save_dtype)
    report(path, "saved")
    return path


def report(path: Path, verb: str) -> None:
    """One line for a CLIP found (shipped or cached: no training now) and two for one just pretrained."""
    metrics_file = path.parent / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    size = f"{path.stat().st_size / 2**20:.1f} MiB"
    if verb == "found":
        where = "shipped" if path.parent.parent.parent == SHIPPED_ROOT else "cached"
        quality = f"; val retrieval top-1 i2t {metrics['i2t_top1']:.3f}" if metrics else ""
        print(f"shapes CLIP ({where}, not retrained): {path} ({size}{quality})", flush=True)
        return
    lines = [f"shapes CLIP {verb}: {path} ({size})"]
    if metrics:
        b = metrics["retrieval_batch"]
        lines.append(
            f"val zero-shot retrieval top-1 at B={b} (chance {1 / b:.3f}): "
            f"image->text {metrics['i2t_top1']:.3f}, text->image {metrics['t2i_top1']:.3f} "
            f"(strict index match {metrics['i2t_top1_strict']:.3f} / {metrics['t2i_top1_strict']:.3f}; "
            f"{metrics['n_pairs']} pairs, {metrics['steps']} steps, {metrics['train_seconds']} s of training)"
        )
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Composing and ensuring (the command line is galip.world.pretrain_clip)
# ---------------------------------------------------------------------------------------------------------
@contextmanager
def _own_hydra():
    """Compose our config even from inside another Hydra app (e.g. galip.train), then give its state back.

    Hydra keeps the job name in a process-wide `JobRuntime`; initialising ours renames the job, and a
    multirun's later jobs would then log to ``pretrain_clip.log``. The outer name is put back with the rest.
    """
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    outer_name = JobRuntime.instance().get("name")
    global_hydra.clear()
    try:
        with hydra.initialize_config_dir(
            version_base="1.3", config_dir=str(CONFIG_DIR), job_name="pretrain_clip"
        ):
            yield
    finally:
        JobRuntime.instance().set("name", outer_name)
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)


def compose_config(overrides: Sequence[str] | None = None) -> DictConfig:
    """The pretraining config with ``overrides`` (``experiment=shapes_clip`` unless one is given)."""
    overrides = normalize_slot_overrides(list(overrides or []))
    if not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(0, f"experiment={DEFAULT_EXPERIMENT}")
    with _own_hydra():
        return hydra.compose(config_name="clip", overrides=overrides)


def ensure_shapes_clip(overrides: Sequence[str] | None = None) -> Path:
    """Path of the shapes world's pretrained CLIP (shipped or ``<cache>/clip/<key>/clip.pt``), trained if needed.

    Load it with ``galip.clip.load_clip(name=None, model_cfg=<tiny model_cfg>, path=...)``.
    """
    return ensure(compose_config(overrides), logs_beside=True)
