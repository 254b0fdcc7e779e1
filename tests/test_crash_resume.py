"""Crash survival in separate processes: a real training run is SIGKILLed mid-run, resumed with ``ckpt_path=last``,
SIGKILLed again while a checkpoint is half-written, resumed again, and ends exactly where an uninterrupted run
ends: the same weights, EMA, optimizer state, noise stream and data position, bit for bit (CPU, one thread).
The W&B (offline) run is the same one all along, as the files W&B wrote say.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent

# 8 batches of 4 (0.032 kimg), a checkpoint every 2 batches (4 optimizer steps), EMA on, W&B offline.
RUN = [
    "+experiment=smoke",
    "data.batch_size=4",
    "trainer.limit_train_batches=null",
    "trainer.max_epochs=-1",
    "kimg=0.032",
    "callbacks.checkpoint.every_n_kimg=0.008",
    "callbacks.sample_grid.every_n_kimg=0",
    "model.ema_half_life_kimg=0.01",
    "logger=wandb",
    "+callbacks.crash._target_=crash_probe.StallSave",
]
FINAL_STEP = 16


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    """``python -m galip.train`` in its own process group (so a kill takes W&B's helper process too)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "GALIP_ROOT": str(run_dir.parent),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",  # bit-equal numbers across processes
    }
    env.pop("HYDRA_FULL_ERROR", None)
    args = [*RUN, f"hydra.run.dir={run_dir}", *extra]
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "galip.train", *args],
            cwd=run_dir.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, run_dir: Path) -> None:
    assert proc.wait(timeout=300) == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()[-4000:]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    """SIGKILL the run's process group as soon as ``ready()`` holds (the run must not finish first)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_training_state(a: dict, b: dict, where: str) -> None:
    """Everything a resume restores, bit for bit: weights (G, D, EMA), both Adams, RNGs (the noise stream
    included), images seen, step, and the data position."""
    assert a["global_step"] == b["global_step"] and a["images_seen"] == b["images_seen"], where
    assert a["state_dict"].keys() == b["state_dict"].keys(), where
    assert any(k.startswith("generator_ema.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), f"{where}: {key}"
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["state"].keys() == opt_b["state"].keys(), where
        for pid, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(value, opt_b["state"][pid][name]), f"{where}: optimizer {pid}.{name}"
    ra, rb = a["rng_states"], b["rng_states"]
    for name in ("torch", "noise"):
        assert torch.equal(ra[name], rb[name]), f"{where}: {name} RNG"
    assert torch.equal(ra["numpy"]["keys"], rb["numpy"]["keys"]) and ra["python"] == rb["python"], where
    assert a["RandomCaptionDataModule"] == b["RandomCaptionDataModule"], where


def periodic(folder: Path) -> list[Path]:
    """The periodic checkpoints (every ``.ckpt`` but ``last.ckpt``), whatever their file names."""
    return sorted(p for p in folder.glob("*.ckpt") if p.name != "last.ckpt")


def half_written(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".tmp"))


def wandb_run_ids(run_dir: Path) -> list[str]:
    """The run id of every W&B run started in ``run_dir``, from W&B's own files (oldest first)."""
    return [
        p.stem.removeprefix("run-") for p in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    ]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """(uninterrupted run dir, crashed-and-resumed run dir, what the two kills left on disk)."""
    root = tmp_path_factory.mktemp("crash")
    full, crashed = root / "full", root / "crashed"
    reference = start(full, "+callbacks.crash.at_save=0")  # in parallel with the crashes: 2 cores
    ckpts, seen = crashed / "checkpoints", {}

    # 1. killed mid-run, once the second periodic checkpoint is on disk (4 and 8 optimizer steps)
    proc = start(crashed, "+callbacks.crash.at_save=0")
    kill_when(proc, lambda: len(periodic(ckpts)) >= 2)
    before = set(half_written(ckpts))  # a kill during a save leaves its temporary file behind
    seen["resumed_from_1"] = load(ckpts / "last.ckpt")["global_step"]

    # 2. resumed, then killed while last.ckpt is rewritten (its 2nd save: the periodic file, then last.ckpt)
    proc = start(crashed, "ckpt_path=last", "+callbacks.crash.at_save=2")
    kill_when(proc, lambda: any(p.name.endswith(".stalled") for p in ckpts.iterdir()))
    seen["tmp"] = sorted(set(half_written(ckpts)) - before)
    seen["complete_after_kill2"] = [load(p)["global_step"] for p in sorted(ckpts.glob("*.ckpt"))]
    seen["resumed_from_2"] = load(ckpts / "last.ckpt")["global_step"]
    seen["unreadable_tmp"] = []
    for tmp in seen["tmp"]:
        with pytest.raises(Exception):  # noqa: B017 (torch raises several types for a truncated file)
            load(tmp)
        seen["unreadable_tmp"].append(tmp.name)

    # 3. resumed to the end
    finish(start(crashed, "ckpt_path=last", "+callbacks.crash.at_save=0"), crashed)
    finish(reference, full)
    return full, crashed, seen


def test_every_checkpoint_on_disk_after_a_kill_is_complete(crashed):
    full, run, seen = crashed
    # killed at or soon after the second checkpoint (last.ckpt is written after the periodic file)
    assert seen["resumed_from_1"] in range(4, FINAL_STEP, 4)
    assert seen["resumed_from_2"] == seen["resumed_from_1"]  # the rewrite of last.ckpt never completed ...
    assert len(seen["tmp"]) == 1 and seen["tmp"][0].name.startswith(".last.ckpt.")  # ... it was half-written
    assert seen["unreadable_tmp"] == [seen["tmp"][0].name]
    assert all(step % 4 == 0 for step in seen["complete_after_kill2"])  # every visible checkpoint loads


def test_resumed_run_ends_bit_equal_to_the_uninterrupted_run(crashed):
    full, run, _ = crashed
    assert_same_training_state(
        load(full / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt"), "end"
    )
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == FINAL_STEP


def test_every_periodic_checkpoint_matches_the_uninterrupted_runs(crashed):
    """Including the ones the resumes started from and the ones written again after a kill."""
    full, run, _ = crashed
    reference = {load(p)["global_step"]: load(p) for p in periodic(full / "checkpoints")}
    assert sorted(reference) == list(range(4, FINAL_STEP + 1, 4))
    written = [(p.name, load(p)) for p in periodic(run / "checkpoints")]
    assert {c["global_step"] for _, c in written} == set(reference)
    for name, ckpt in written:
        assert_same_training_state(reference[ckpt["global_step"]], ckpt, name)


def test_a_resumed_run_writes_no_second_copy_of_a_checkpoint(crashed):
    """A checkpoint the killed run had written is written again by the resume, under its own name (no -v1)."""
    full, run, _ = crashed
    assert [p.name for p in periodic(run / "checkpoints")] == [p.name for p in periodic(full / "checkpoints")]


def test_ema_differs_from_g_in_the_checkpoints(crashed):
    _, run, _ = crashed
    state = load(run / "checkpoints" / "last.ckpt")["state_dict"]
    ema = {k.removeprefix("generator_ema."): v for k, v in state.items() if k.startswith("generator_ema.")}
    assert ema.keys() == {k.removeprefix("generator.") for k in state if k.startswith("generator.")}
    assert any(not torch.equal(v, state[f"generator.{k}"]) for k, v in ema.items())


def test_the_wandb_run_is_resumed_not_restarted(crashed):
    full, run, _ = crashed
    ids = wandb_run_ids(run)
    assert len(ids) == 3 and len(set(ids)) == 1, ids  # three processes, one W&B run
    assert load(run / "checkpoints" / "last.ckpt")["wandb_run_id"] == ids[0]
    assert wandb_run_ids(full) != ids[:1]  # a fresh run gets a fresh id
