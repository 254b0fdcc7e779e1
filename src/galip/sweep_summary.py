"""One table for a sweep: each run's final evaluation, as ``summary.md`` and ``summary.csv``.

A run is a sub-directory of the sweep directory with Hydra's ``.hydra/overrides.yaml``; its row is labelled
by the overrides that differ between the runs (``ablation=baseline``, ``model.tap_blocks=[0]``) and filled
from the last line of its ``evaluation.jsonl`` (written by `galip.callbacks.PeriodicEvaluation`, whatever
evaluators the run had: FID/CLIPSIM, the embedded world's judge, …).

* ``hydra.callbacks`` (``+sweep=summary``, included by every ``conf/sweep`` file): written when all jobs of
  a ``-m`` run have returned, on the machine that launched them;
* ``python -m galip.sweep_summary <sweep dir>``: rebuilds them, e.g. while or after jobs run elsewhere.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

EVALUATION_FILE = "evaluation.jsonl"
PREFIX = "eval/"  # PeriodicEvaluation's default prefix, left out of the column names
FIRST = ("fid", "clipsim", "judge/acc", "judge/fd")  # shown first when a run has them


@dataclass
class Run:
    """What the summary shows of one run directory."""

    directory: Path
    overrides: list[str]
    batch: int | None = None
    kimg: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def read_run(directory: Path) -> Run:
    overrides = yaml.safe_load((directory / ".hydra" / "overrides.yaml").read_text()) or []
    run = Run(directory, [str(o) for o in overrides])
    lines = _lines(directory / EVALUATION_FILE)
    if lines:
        last = json.loads(lines[-1])
        metrics = last.get("metrics", {})
        run.batch, run.kimg = last.get("batch"), last.get("kimg")
        run.metrics = {k.removeprefix(PREFIX): v for k, v in metrics.items()}
    return run


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def find_runs(sweep_dir: Path) -> list[Run]:
    """Runs in job order (Hydra names them 0, 1, …; other names sort after, alphabetically)."""
    dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    dirs.sort(key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    return [read_run(d) for d in dirs]


def labels(runs: Sequence[Run]) -> list[str]:
    """Each run's overrides minus those every run shares (all of them when there is one run)."""
    shared = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    return [" ".join(o for o in r.overrides if o not in shared) or "(defaults)" for r in runs]


def metric_names(runs: Sequence[Run]) -> list[str]:
    """Union of the runs' metric names, the headline ones (`FIRST`) first, the rest in first-seen order."""
    names: dict[str, None] = {}
    for name in FIRST:
        if any(name in r.metrics for r in runs):
            names[name] = None
    for run in runs:
        names.update(dict.fromkeys(run.metrics))
    return list(names)


def table_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[Any]]]:
    names = metric_names(runs)
    header = ["run", "overrides", "batch", "kimg", *names]
    rows = [
        [r.directory.name, label, r.batch, r.kimg, *(r.metrics.get(n) for n in names)]
        for r, label in zip(runs, labels(runs), strict=True)
    ]
    return header, rows


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):  # counts and distances whole, fractions to three places
        return (
            f"{value:,.0f}"
            if abs(value) >= 100 or (value.is_integer() and abs(value) >= 2)
            else f"{value:.3f}"
        )
    return str(value)


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path) -> str:
    """Write ``summary.md`` and ``summary.csv`` into the sweep directory; returns the markdown table."""
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no runs (*/.hydra/overrides.yaml) under {sweep_dir}")
    header, rows = table_rows(runs)
    table = markdown(header, rows)
    missing = [r.directory.name for r in runs if not r.metrics]
    note = f"\nNo {EVALUATION_FILE} (or an empty one) in: {', '.join(missing)}\n" if missing else ""
    (sweep_dir / "summary.md").write_text(f"# Sweep {sweep_dir}\n\n{table}{note}")
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *[["" if v is None else v for v in row] for row in rows]])
    return table


class SweepSummary(Callback):
    """Hydra callback: the summary table once every job of a multirun has returned."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_summary(sweep_dir)
        print(f"sweep summary: {sweep_dir / 'summary.md'}\n{table}", flush=True)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m galip.sweep_summary <sweep dir>", file=sys.stderr)
        return 2
    try:
        print(write_summary(argv[0]), end="")
    except FileNotFoundError as err:
        print(f"galip: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
