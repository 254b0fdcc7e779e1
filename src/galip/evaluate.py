"""Evaluate a generator: ``python -m galip.evaluate ckpt=…/generator.safetensors data=coco``.

FID (torchmetrics) and CLIPSIM on a data split's captions, following the one protocol of
`galip.metrics.protocol` (docs/evaluation.md), plus any evaluator the data brings (``metrics.extra``: the
embedded world's judge with ``data=shapes``). The training callback runs the same evaluators. Every printed
number states N and what it was compared with; the results also go to a JSON file.

ckpt -> generator -> evaluators -> generate + score -> print and write.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from galip.clip import FrozenCLIP
from galip.clip.backbone import PACKAGE_DIR
from galip.config import data_name, fid_features, register_resolvers
from galip.loading import load_generator
from galip.metrics.fid import EXTRACTORS
from galip.metrics.protocol import FIDEvaluator, Subject, run_evaluators
from galip.sampling import Sampler


def evaluators(cfg: DictConfig) -> dict[str, Any]:
    """FID/CLIPSIM as ``metrics.fid`` / ``metrics.clipsim`` say, then every ``metrics.extra`` evaluator."""
    metrics, out = cfg.metrics, {}
    if (
        metrics.fid.enabled
        and metrics.fid.extractor not in EXTRACTORS
        and metrics.fid.get("features") is None
    ):
        raise ValueError(
            f"metrics.fid.extractor={metrics.fid.extractor} is not built in ({', '.join(EXTRACTORS)}) and "
            f"data={data_name(cfg)} gives it no network (metrics.fid.features); the judge extractor exists for "
            "data=shapes and data=shapes_demo"
        )
    if metrics.fid.enabled or metrics.clipsim.enabled:
        out["fid"] = FIDEvaluator(
            n_samples=cfg.n_samples,
            fid=bool(metrics.fid.enabled),
            extractor=metrics.fid.extractor,
            inception_weights=metrics.get("inception_weights"),
            download=bool(metrics.get("download", False)),
            reference=metrics.fid.get("reference"),
            reference_extractor=metrics.fid.get("reference_extractor"),
            antialias=bool(metrics.fid.get("antialias", False)),
            features=fid_features(metrics) if metrics.fid.enabled else None,
            clipsim=instantiate(metrics.clipsim.clip) if metrics.clipsim.enabled else None,
            split=cfg.split,
            seed=cfg.seed,
        )
    for name, node in (metrics.get("extra") or {}).items():
        if node is not None:
            out[name] = instantiate(node)
    if not out:
        raise ValueError(
            "nothing to evaluate: metrics.fid.enabled and metrics.clipsim.enabled are false and metrics.extra is empty"
        )
    return out


def check_data(cfg: DictConfig) -> None:
    """The split's data must be there before any network is built or loaded (one line naming what is missing)."""
    datamodule = instantiate(cfg.data, tokenizer=None)
    datamodule.setup("validate" if cfg.split == "val" else "test")


def subject(cfg: DictConfig, sampler: Sampler, bar: tqdm | None = None) -> Subject:
    """The sampler as evaluators see it; the images it generates are counted on ``bar``."""
    datamodule = instantiate(cfg.data, tokenizer=sampler.clip.tokenizer)
    datamodule.setup("validate" if cfg.split == "val" else "test")

    def generate(captions, noise):
        images = sampler.from_vectors(sampler.sentence_vectors(captions), noise, cfg.batch_size)
        if bar is not None:
            bar.update(len(captions))
        return images

    return Subject(generate, sampler.generator.nz, sampler.device, sampler.clip, datamodule)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    check_data(cfg)
    chosen = evaluators(cfg)  # then missing Inception or CLIP weights stop before G is loaded
    sampler = Sampler(
        load_generator(cfg.ckpt, cfg.get("run_config")), cfg.device, precision=cfg.get("precision", "fp32")
    )
    total = sum(getattr(e, "n_samples", 0) for e in chosen.values()) or None  # N=30000 takes a while
    with tqdm(total=total, desc="generating", unit="img", file=sys.stderr) as bar:
        metrics = run_evaluators(chosen, subject(cfg, sampler, bar))
    return report(cfg, metrics, clipsim_is_gs(chosen.values(), sampler.clip))


def clipsim_is_gs(chosen: Iterable[Any], g_clip: FrozenCLIP) -> bool:
    """Whether CLIPSIM scores with the CLIP G was trained against (G's own, or one with the same weights)."""
    for evaluator in chosen:
        choice = getattr(evaluator, "clipsim_choice", None)
        if choice == "model":
            return True
        if isinstance(choice, FrozenCLIP):
            mine, theirs = choice.model.state_dict(), g_clip.model.state_dict()
            return mine.keys() == theirs.keys() and all(
                mine[k].shape == theirs[k].shape and torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine
            )
    return False


def report(cfg: DictConfig, metrics: dict[str, float], clipsim_of_g: bool = False) -> dict[str, Any]:
    """Print one line per metric, each with its N and reference, and write the results JSON."""
    where = f"{data_name(cfg)}/{cfg.split}"
    precision = cfg.get("precision", "fp32")
    drawn = "" if precision == "fp32" else f", G in {precision}"
    lines = [f"galip.evaluate: {cfg.ckpt} on {where} (seed {cfg.seed}{drawn})"]
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
            f"{'/' + clip.pretrained if clip.get('pretrained') else ''} "
            + ("(the CLIP G was trained against: partly optimised)" if clipsim_of_g else "(not G's CLIP)")
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
        "precision": precision,
        "metrics": metrics,
        "protocol": OmegaConf.to_container(cfg.metrics, resolve=False),
    }
    out = (
        Path(cfg.out)
        if cfg.get("out")
        else results_dir(Path(cfg.ckpt)) / f"eval_{data_name(cfg)}_{cfg.split}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines.append(f"results -> {out}")
    print("\n".join(lines), flush=True)
    return result


def results_dir(ckpt: Path) -> Path:
    """Where the results JSON goes by default: next to the checkpoint, or for a generator shipped inside the
    package (which may be installed read-only) under ``outputs/evaluate`` of the working directory."""
    beside = ckpt if ckpt.is_dir() else ckpt.parent
    return Path("outputs/evaluate") if beside.resolve().is_relative_to(PACKAGE_DIR) else beside


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        print(
            "galip: ckpt=PATH is required (<run dir>/generator.safetensors, a Lightning .ckpt or a run directory)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        evaluate(cfg)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"galip: {str(cause).strip(chr(39))}", file=sys.stderr)
        sys.exit(2)


def user_error(err: BaseException | None) -> BaseException | None:
    """The missing file, bad value or unknown key in ``err``'s cause chain (Hydra's instantiate wraps what a
    target raised), or None for a bug."""
    while err is not None and not isinstance(err, FileNotFoundError | ValueError | KeyError):
        err = err.__cause__ or err.__context__
    return err


if __name__ == "__main__":
    register_resolvers()
    main()
