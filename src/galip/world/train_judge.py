"""Train the embedded world's judge: ``python -m galip.world.train_judge [--data PRESET] [--out PATH] [--steps N]``.

``--data shapes_demo`` trains the judge of that data preset's world at its image size (the one the demo's
evaluation uses); the default is the full world's at 64 px.

Without ``--out`` the judge goes to the config-keyed cache (``galip.world.cache.artefact_dir("judge", config)``),
so rerunning with the same config finds it and skips training; a changed config trains a new one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from galip.world.artefacts import build_judge, cached_judge_path, data_world, world_judge_config
from galip.world.judge import DEFAULT_TRAIN_CONFIG


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m galip.world.train_judge", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--data", default="shapes", help="the data preset whose world it judges (shapes_demo, …)"
    )
    parser.add_argument("--out", type=Path, default=None, help="judge file (default: the config-keyed cache)")
    parser.add_argument("--steps", type=int, default=None, help=f"default {DEFAULT_TRAIN_CONFIG['steps']}")
    parser.add_argument("--seed", type=int, default=None, help=f"default {DEFAULT_TRAIN_CONFIG['seed']}")
    parser.add_argument("--force", action="store_true", help="retrain even when the cache has this judge")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    config = world_judge_config(*data_world(args.data))
    config |= {k: v for k, v in {"steps": args.steps, "seed": args.seed}.items() if v is not None}
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
