"""Train the embedded world's judge: ``python -m galip.world.train_judge [--out PATH] [--steps N] [--seed S]``.

Without ``--out`` the judge goes to the config-keyed cache (``galip.world.cache.artefact_dir("judge", config)``),
so rerunning with the same config finds it and skips training; a changed config trains a new one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from galip.world.cache import artefact_dir, write_config
from galip.world.judge import DEFAULT_TRAIN_CONFIG, JUDGE_FORMAT, save_judge, train_judge

JUDGE_FILE = "judge.pt"


def judge_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full training config (defaults + overrides); with the file format it keys the cache."""
    unknown = set(config or {}) - set(DEFAULT_TRAIN_CONFIG)
    if unknown:
        raise KeyError(f"unknown judge config keys {sorted(unknown)}; known: {sorted(DEFAULT_TRAIN_CONFIG)}")
    return {**DEFAULT_TRAIN_CONFIG, **(config or {}), "format": JUDGE_FORMAT}


def cached_judge_path(config: Mapping[str, Any] | None = None) -> Path:
    return artefact_dir("judge", judge_config(config)) / JUDGE_FILE


def build_judge(config: Mapping[str, Any] | None, out: str | Path, log=print) -> dict[str, float]:
    """Train with ``config`` and write ``out`` (plus config.json and metrics.json beside it)."""
    cfg = judge_config(config)
    train_cfg = {k: v for k, v in cfg.items() if k != "format"}
    judge, metrics = train_judge(train_cfg, log=log)
    out = save_judge(out, judge, metrics, train_cfg)
    write_config(out.parent, cfg)
    (out.parent / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log(f"judge: wrote {out}")
    return metrics


def ensure_judge(config: Mapping[str, Any] | None = None, log=print) -> Path:
    """The cached judge for ``config`` (defaults when None), training it first if it is not there yet."""
    path = cached_judge_path(config)
    if path.is_file():
        log(f"judge: cached at {path}, not retraining")
    else:
        build_judge(config, path, log=log)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m galip.world.train_judge", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="judge file (default: the config-keyed cache)")
    parser.add_argument("--steps", type=int, default=None, help=f"default {DEFAULT_TRAIN_CONFIG['steps']}")
    parser.add_argument("--seed", type=int, default=None, help=f"default {DEFAULT_TRAIN_CONFIG['seed']}")
    parser.add_argument("--force", action="store_true", help="retrain even when the cache has this judge")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    config = {k: v for k, v in {"steps": args.steps, "seed": args.seed}.items() if v is not None}
    path = args.out if args.out is not None else cached_judge_path(config)
    if args.out is None and path.is_file() and not args.force:
        print(f"judge: cached at {path}, not retraining (--force retrains)")
        metrics = json.loads((path.parent / "metrics.json").read_text())
    else:
        metrics = build_judge(config, path)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    return metrics


if __name__ == "__main__":
    main()
