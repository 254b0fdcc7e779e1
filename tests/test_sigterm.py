"""SIGTERM mid-run (a cluster's preemption, ``kill``, a job's time limit), in separate processes: the run writes
``last.ckpt`` at the end of the batch the signal came in, says so in one line and exits with 143 (Lightning
alone ends the fit silently with status 0); resumed with ``ckpt_path=last`` it ends bit-equal to an
uninterrupted run."""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from galip.data.batch import Loader
from tests.test_crash_resume import assert_same_training_state, finish, load, start

TERM_AT = ("+callbacks.term._target_=crash_probe.SignalAt", "+callbacks.term.at_batch=3")


@pytest.fixture(scope="module")
def terminated(tmp_path_factory):
    """(uninterrupted run dir, terminated-and-resumed run dir, exit status, console, last.ckpt at the stop)."""
    root = tmp_path_factory.mktemp("sigterm")
    full, run = root / "full", root / "term"
    reference = start(full, "+callbacks.crash.at_save=0")  # in parallel: 2 cores
    status = start(run, "+callbacks.crash.at_save=0", *TERM_AT).wait(timeout=300)
    console = (root / "term.log").read_text()
    at_stop = load(run / "checkpoints" / "last.ckpt")
    finish(start(run, "ckpt_path=last", "+callbacks.crash.at_save=0"), run)
    finish(reference, full)
    return full, run, status, console, at_stop


def test_sigterm_saves_the_batch_it_came_in_says_so_and_exits_143(terminated):
    _, run, status, console, at_stop = terminated
    assert status == 143, console[-3000:]
    # batch 3 of 4 images: the checkpoint every 2 batches was at batch 2; last.ckpt is at batch 3
    assert at_stop["images_seen"] == 12 and at_stop["global_step"] == 6
    lines = [line for line in console.splitlines() if line.startswith("galip: ")]
    assert len(lines) == 1, console[-3000:]
    assert lines[0].startswith("galip: stopped by SIGTERM after 3 batches (0.012 of 0.032 kimg); ")
    assert f"hydra.run.dir={run} ckpt_path=last" in lines[0] and "Traceback" not in console


def test_the_run_resumed_after_sigterm_ends_bit_equal_to_the_uninterrupted_run(terminated):
    full, run, *_ = terminated
    assert_same_training_state(
        load(full / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt"), "end"
    )


def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(tmp_path):
    """Ctrl+C lands in the middle of a batch, so nothing is saved then (Lightning stops at once): the line names
    the last saved point, and the status is 130 (128 + SIGINT) instead of Lightning's 1."""
    run = tmp_path / "run"
    run.mkdir()
    status = start(run, "+callbacks.crash.at_save=0", *TERM_AT, "+callbacks.term.name=SIGINT").wait(
        timeout=300
    )
    console = (tmp_path / "run.log").read_text()
    assert status == 130, console[-3000:]
    lines = [line for line in console.splitlines() if line.startswith("galip: ")]
    assert lines == [
        "galip: stopped by Ctrl+C after 2 batches (0.008 of 0.032 kimg); "
        f"{run / 'checkpoints' / 'last.ckpt'} holds the last saved point: resume with the run's overrides and "
        f"hydra.run.dir={run} ckpt_path=last"
    ], console[-3000:]
    assert load(run / "checkpoints" / "last.ckpt")["images_seen"] == 8 and "Traceback" not in console


class SlowRange(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> int:
        time.sleep(0.05)  # the workers are still busy when the signal comes
        return index


def mark_started(folder: Path, worker_id: int) -> None:
    (folder / str(worker_id)).touch()


@pytest.mark.parametrize("loader_class", [Loader, DataLoader])
def test_the_loaders_workers_live_through_a_sigterm_to_the_job(tmp_path, loader_class):
    """A signal to the whole job reaches the loader's workers too: galip's loader's workers ignore it (and still
    run the worker_init_fn they were given: Lightning's seeding); a plain DataLoader's die, and PyTorch raises
    in the main process, which is what stopped a preempted run in the middle of its batch."""
    loader = loader_class(
        SlowRange(), batch_size=2, num_workers=2, worker_init_fn=partial(mark_started, tmp_path)
    )
    batches = iter(loader)
    first = next(batches)
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGTERM)
    if loader_class is DataLoader:
        with pytest.raises(RuntimeError, match="killed by signal: Terminated|exited unexpectedly"):
            list(batches)
        return
    assert sorted(torch.cat([first, *batches]).tolist()) == list(range(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1"]
