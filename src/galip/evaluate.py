"""Evaluate a generator: ``python -m galip.evaluate ckpt=…/generator.safetensors data=coco``.

FID (torchmetrics) and CLIPSIM on a data split's captions, following the one protocol of
`galip.metrics.protocol` (docs/evaluation.md); on the embedded shapes world (``data=shapes``) the judge's metrics
too. Every printed number states N and what it was compared with; the results also go to a JSON file.

ckpt -> generator -> metrics -> generate + score -> print and write.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from galip.metrics.clipsim import CLIPSimilarity
from galip.metrics.fid import FrechetDistance, make_fid
from galip.metrics.protocol import score_generator
from galip.metrics.reference_stats import load_reference, seed_fid
from galip.models import Generator
from galip.sampling import Sampler
from galip.train import module_from_checkpoint
from galip.world import register_resolvers


# ---------------------------------------------------------------------------------------------
# The generator: an export, or a Lightning checkpoint (EMA weights when it has them)
# ---------------------------------------------------------------------------------------------
def load_sampler(ckpt: str | Path, device: str = "cpu", run_config: str | Path | None = None) -> Sampler:
    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt={path}: no such file (a generator.safetensors export or a Lightning .ckpt)"
        )
    if path.suffix == ".safetensors":
        return Sampler.from_export(path, device=device)
    if path.suffix == ".ckpt":
        return Sampler(generator_from_lightning(path, run_config), device)
    raise ValueError(
        f"ckpt={path}: expected a generator export (.safetensors) or a Lightning checkpoint (.ckpt)"
    )


def generator_from_lightning(path: Path, run_config: str | Path | None = None) -> Generator:
    """G from a training checkpoint (its EMA when the run kept one), rebuilt with the run's own config
    (``<run>/.hydra/config.yaml``)."""
    config_file = Path(run_config) if run_config else path.resolve().parent.parent / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no run config at {config_file} to rebuild the generator of {path}: pass run_config=<run>/.hydra/config.yaml"
        )
    return module_from_checkpoint(path, config_file).sampling_generator


def generate_fn(sampler: Sampler, batch_size: int):
    """(captions, noise) -> clamped images, the form the protocol and the judge take."""
    return lambda captions, noise: sampler.from_vectors(sampler.sentence_vectors(captions), noise, batch_size)


# ---------------------------------------------------------------------------------------------
# Metrics from the config (shared with the reference-statistics tool)
# ---------------------------------------------------------------------------------------------
def build_fid(metrics: DictConfig, device: str = "cpu") -> FrechetDistance:
    judge = load_judge_for(metrics) if metrics.fid.extractor == "judge" else None
    fid = make_fid(
        metrics.fid.extractor,
        weights=metrics.get("inception_weights"),
        download=bool(metrics.get("download", False)),
        judge=judge,
        antialias=bool(metrics.fid.get("antialias", False)),
    )
    if metrics.fid.get("reference"):
        seed_fid(fid, load_reference(metrics.fid.reference, metrics.fid.get("reference_extractor")))
    return fid.to(device)


def load_judge_for(metrics: DictConfig):
    from galip.metrics.judge import load_judge

    return load_judge(metrics.judge.path)


def data_name(cfg: DictConfig) -> str:
    """The data config's name (``coco``, ``shapes``, …) for printed lines and file names."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("data") or "data"
    except (ValueError, AttributeError):
        return cfg.data._target_.rsplit(".", 1)[-1]


def split_loader(cfg: DictConfig, tokenizer):
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("validate" if cfg.split == "val" else "test")
    return datamodule.val_dataloader() if cfg.split == "val" else datamodule.test_dataloader()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    sampler = load_sampler(cfg.ckpt, cfg.device, cfg.get("run_config"))
    generate = generate_fn(sampler, cfg.batch_size)
    metrics: dict[str, float] = {}
    if cfg.metrics.judge.enabled:
        metrics.update(judge_metrics(cfg, generate, sampler.generator.nz))
    if cfg.metrics.fid.enabled or cfg.metrics.clipsim.enabled:
        fid = build_fid(cfg.metrics, cfg.device) if cfg.metrics.fid.enabled else None
        clipsim = (
            CLIPSimilarity(instantiate(cfg.metrics.clipsim.clip)).to(cfg.device)
            if cfg.metrics.clipsim.enabled
            else None
        )
        loader = split_loader(cfg, sampler.clip.tokenizer)
        metrics.update(
            score_generator(generate, loader, cfg.n_samples, sampler.generator.nz, fid, clipsim, cfg.seed)
        )
    return report(cfg, metrics)


def judge_metrics(cfg: DictConfig, generate, nz: int) -> dict[str, float]:
    from galip.data.shapes import ShapesWorld
    from galip.metrics.judge import evaluate_generator

    n = cfg.metrics.judge.get("n_samples") or cfg.n_samples
    world = ShapesWorld(cfg.data.seed, cfg.split, n, cfg.data.image_size, cfg.data.get("max_objects", 3))
    judge = load_judge_for(cfg.metrics).to(cfg.device)
    return evaluate_generator(generate, world, judge, n=n, batch_size=cfg.batch_size, seed=cfg.seed, nz=nz)


def report(cfg: DictConfig, metrics: dict[str, float]) -> dict[str, Any]:
    """Print one line per metric, each with its N and reference, and write the results JSON."""
    where = f"{data_name(cfg)}/{cfg.split}"
    lines = [f"galip.evaluate: {cfg.ckpt} on {where} (seed {cfg.seed})"]
    reference = cfg.metrics.fid.get("reference") or f"the {where} images"
    if "fid" in metrics:
        n_real = "N unknown" if math.isnan(metrics["fid/n_real"]) else f"N={int(metrics['fid/n_real'])}"
        lines.append(
            f"  FID      {metrics['fid']:.4f}   N={int(metrics['fid/n'])} generated vs {reference} ({n_real} real); "
            f"extractor {cfg.metrics.fid.extractor}"
        )
    if "clipsim" in metrics:
        clip = cfg.metrics.clipsim.clip
        name = clip.get("name") or Path(str(clip.get("path") or "tiny")).name
        lines.append(
            f"  CLIPSIM  {metrics['clipsim']:.4f} (x100 = {100 * metrics['clipsim']:.2f})   "
            f"N={int(metrics['clipsim/n'])} images vs their {where} captions; CLIP {name}"
            f"{'/' + clip.pretrained if clip.get('pretrained') else ''} (the CLIP G was trained against: partly optimised)"
        )
    judge = {k: v for k, v in metrics.items() if k.startswith("judge/") and k != "judge/n"}
    if judge:
        n = int(metrics["judge/n"])
        lines.append(f"  judge    N={n} images for {where} scenes (judge/fd vs the same scenes rendered):")
        lines += [f"    {k:<22} {v:.4f}" for k, v in judge.items()]
    result = {
        "ckpt": str(cfg.ckpt),
        "data": data_name(cfg),
        "split": cfg.split,
        "seed": cfg.seed,
        "metrics": metrics,
        "protocol": OmegaConf.to_container(cfg.metrics, resolve=False),
    }
    out = (
        Path(cfg.out) if cfg.get("out") else Path(cfg.ckpt).parent / f"eval_{data_name(cfg)}_{cfg.split}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines.append(f"results -> {out}")
    print("\n".join(lines), flush=True)
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        print(
            "galip: ckpt=PATH is required (<run dir>/generator.safetensors or a Lightning .ckpt)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        evaluate(cfg)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"galip: {str(err).strip(chr(39))}", file=sys.stderr)
        sys.exit(2)


register_resolvers()

if __name__ == "__main__":
    main()
