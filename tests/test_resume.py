"""Experiment management: exact resume, atomic checkpoints, what a checkpoint carries, status/stats, W&B."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

import galip
from galip.atomic_io import AtomicCheckpointIO
from galip.config import ConfigError
from galip.train import train
from tests.helpers import compose_config, tensorboard_events

# 32 samples / batch 4 = 8 batches per epoch; the checkpoint every 0.012 kimg is batch 3 (optimizer step 6),
# mid-epoch; 0.04 kimg = 10 batches (20 optimizer steps), so the resumed run also crosses into the next epoch.
RUN = [
    "+experiment=smoke",
    "data.n_train=32",
    "data.batch_size=4",
    "kimg=0.04",
    "callbacks.checkpoint.every_n_kimg=0.012",
    "callbacks.status.every_n_kimg=0.008",
]


def run(out: Path, *extra: str):
    cfg = compose_config([*RUN, *extra], output_dir=out)
    train(cfg)
    return cfg


def logged(out: Path) -> dict[int, dict[str, float]]:
    """CSV rows per step: {step: {metric: value}} for the step-wise training terms."""
    rows: dict[int, dict[str, float]] = {}
    with open(out / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}
            if "d/loss" in values:
                rows.setdefault(int(row["step"]), {}).update(values)
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and one resumed from its mid-epoch checkpoint."""
    root = tmp_path_factory.mktemp("resume")
    full, resumed = root / "full", root / "resumed"
    run(full)
    run(resumed, f"ckpt_path={full / 'checkpoints' / 'kimg000000.012.ckpt'}")
    return full, resumed


def test_resumed_run_follows_the_uninterrupted_trajectory(runs):
    full, resumed = runs
    a, b = logged(full), logged(resumed)
    # Lightning's logging step counts batches (not optimizer steps) under manual optimisation
    assert sorted(a) == list(range(10))
    assert sorted(b) == list(range(3, 10)), "the resumed run continues after batch 3, up to batch 10"
    for step in b:
        for key in ("d/loss", "d/magp", "g/loss", "g/sim", "kimg"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_resumed_run_ends_with_the_same_weights_and_optimizer_state(runs):
    full, resumed = runs
    ends = [torch.load(p / "checkpoints" / "last.ckpt", weights_only=False) for p in runs]
    assert ends[0]["global_step"] == ends[1]["global_step"] == 20
    for key, value in ends[0]["state_dict"].items():
        torch.testing.assert_close(ends[1]["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for opt_a, opt_b in zip(ends[0]["optimizer_states"], ends[1]["optimizer_states"], strict=True):
        for pid, state in opt_a["state"].items():
            torch.testing.assert_close(
                opt_b["state"][pid]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5, atol=1e-9
            )
    assert ends[0]["images_seen"] == ends[1]["images_seen"] == 40


def test_checkpoint_carries_config_version_rng_and_data_position(runs):
    full, _ = runs
    ckpt = torch.load(full / "checkpoints" / "kimg000000.012.ckpt", weights_only=False)
    assert ckpt["galip_version"] == galip.__version__
    assert ckpt["config"]["task_name"] == "smoke" and ckpt["config"]["data"]["batch_size"] == 4
    assert set(ckpt["rng_states"]) >= {"torch", "numpy", "python", "noise"}
    assert ckpt["RandomCaptionDataModule"] == {"epoch": 0, "batches": 3}
    assert len(ckpt["optimizer_states"]) == 2
    assert not any(k.startswith("clip.") for k in ckpt["state_dict"])


def test_stats_jsonl_beside_the_checkpoints(runs):
    full, _ = runs
    lines = [json.loads(x) for x in (full / "checkpoints" / "stats.jsonl").read_text().splitlines()]
    assert [x["batch"] for x in lines] == [2, 4, 6, 8, 10]
    assert [x["kimg"] for x in lines] == pytest.approx([0.008, 0.016, 0.024, 0.032, 0.040])
    assert all(x["images_per_s"] > 0 and x["peak_mem_gb"] > 0 and "d/loss" in x for x in lines)


def test_ckpt_path_last_without_a_checkpoint_is_a_config_error(tmp_path):
    cfg = compose_config([*RUN, "ckpt_path=last"], output_dir=tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"ckpt_path=last: no checkpoint at .*last\.ckpt"):
        train(cfg)


# ---------------------------------------------------------------------------------------------
# Atomic checkpoint writes
# ---------------------------------------------------------------------------------------------


def crash_mid_write(self, checkpoint, path, storage_options=None):
    Path(path).write_bytes(b"half a checkpoint")
    raise OSError("disk full")


@pytest.mark.parametrize("io_cls, survives", [(AtomicCheckpointIO, True), (TorchCheckpointIO, False)])
def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, io_cls, survives):
    path = tmp_path / "last.ckpt"
    io_cls().save_checkpoint({"global_step": 1}, path)
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        io_cls().save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    if survives:
        assert TorchCheckpointIO().load_checkpoint(path)["global_step"] == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind
    else:  # the plain writer is what the atomic one protects against
        assert path.read_bytes() == b"half a checkpoint"


def test_the_trainer_config_writes_checkpoints_atomically(tmp_path):
    cfg = compose_config(["+experiment=smoke"], output_dir=tmp_path)
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---------------------------------------------------------------------------------------------
# Weights & Biases (offline: nothing reaches the network)
# ---------------------------------------------------------------------------------------------


def test_offline_wandb_run_has_the_logged_keys_and_is_finished(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "wb"
    run(out, "logger=wandb", "kimg=0.008", "callbacks.checkpoint.every_n_kimg=0.004")
    assert wandb.run is None, "the run is finished when training returns"
    records = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(records) == 1
    data = Path(records[0]).read_bytes()
    for key in (b"d/loss", b"g/sim", b"grad_norm/g", b"kimg", b"params/trainable", b"perf/images_per_s"):
        assert key in data, key
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["wandb_run_id"] == Path(records[0]).stem.removeprefix("run-")


def test_resumed_run_continues_the_wandb_run(tmp_path, monkeypatch):
    from galip.train import continue_wandb_run

    cfg = compose_config(["+experiment=smoke", "logger=wandb"], output_dir=tmp_path)
    continue_wandb_run(cfg, {"wandb_run_id": "abc123"})
    assert cfg.logger.wandb.id == "abc123" and cfg.logger.wandb.resume == "allow"


def test_wandb_is_finished_when_training_crashes(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")

    def boom(*args, **kwargs):
        raise RuntimeError("crash inside fit")

    monkeypatch.setattr("lightning.Trainer.fit", boom)
    with pytest.raises(RuntimeError, match="crash inside fit"):
        run(tmp_path / "crash", "logger=wandb")
    # the logger had started its run (log_hyperparams) before fit; finish_wandb closed it
    assert wandb.run is None


# ---------------------------------------------------------------------------------------------
# Resuming in the run's own directory, as the README shows
# ---------------------------------------------------------------------------------------------
SMOKE = ["+experiment=smoke", "logger=csv"]  # 4 batches of 4 = 0.016 kimg


def csv_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "csv" / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("d/loss")]


@pytest.fixture(scope="module")
def finished_smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "run"
    train(compose_config(SMOKE, output_dir=out))
    return out


@pytest.fixture
def smoke_run(finished_smoke, tmp_path) -> Path:
    """A copy of a finished smoke run's directory."""
    return Path(shutil.copytree(finished_smoke, tmp_path / "run"))


def test_resume_in_place_appends_to_the_csv_and_replaces_rows_after_the_checkpoint(smoke_run):
    out = smoke_run
    before = csv_rows(out)
    assert [r["step"] for r in before] == ["0", "1", "2", "3"]
    with open(out / "csv" / "metrics.csv", "a", newline="") as f:  # a killed run's row past its checkpoint
        csv.DictWriter(f, fieldnames=list(before[0])).writerow({**before[0], "step": "4", "kimg": "9"})
    train(compose_config([*SMOKE, "ckpt_path=last", "kimg=0.032"], output_dir=out))
    after = csv_rows(out)
    assert [r["step"] for r in after] == [str(i) for i in range(8)]
    assert after[:4] == before, "the rows before the resume are kept as they were"
    assert float(after[4]["kimg"]) == pytest.approx(0.020) and after[4]["d/loss"] != ""


def test_resume_tells_tensorboard_to_drop_what_was_logged_after_the_checkpoint(tmp_path, recwarn):
    """The resumed run's event file opens with a purge at the first step it logs (4: the batches the
    checkpoint has seen), so TensorBoard drops a killed run's events from there on instead of drawing those
    steps twice; the resumed file then holds steps 4..7 only."""
    out, args = tmp_path / "run", ["+experiment=smoke", "logger=tensorboard"]
    train(compose_config(args, output_dir=out))
    (first,) = (out / "tensorboard").glob("events.out.tfevents.*")
    recwarn.clear()
    train(compose_config([*args, "ckpt_path=last", "kimg=0.032"], output_dir=out))
    assert not [
        w for w in recwarn if "exists and is not empty" in str(w.message)
    ]  # resuming in place is the point
    (second,) = set((out / "tensorboard").glob("events.out.tfevents.*")) - {first}
    events = tensorboard_events(second)
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]  # START
    assert starts == [4]
    logged = {e.step for e in events for v in e.summary.value if v.tag == "d/loss"}
    assert logged == {4, 5, 6, 7}
    assert {e.step for e in tensorboard_events(first) for v in e.summary.value if v.tag == "d/loss"} == {
        0,
        1,
        2,
        3,
    }


def test_resume_of_a_finished_run_says_how_to_train_on(smoke_run):
    out = smoke_run
    with pytest.raises(
        ConfigError, match=r"already seen 0.016 kimg of the run's kimg=0.016; give a larger kimg="
    ):
        train(compose_config([*SMOKE, "ckpt_path=last"], output_dir=out))


def test_resume_with_other_networks_names_the_changed_keys(smoke_run):
    out = smoke_run
    cfg = compose_config([*SMOKE, "ckpt_path=last", "kimg=0.032", "model.generator.ngf=8"], output_dir=out)
    with pytest.raises(ConfigError, match=r"changes model.generator.ngf from the run .*overrides\.yaml"):
        train(cfg)
    # the speed switch is not part of the weights: changing it resumes
    cfg = compose_config(
        [*SMOKE, "ckpt_path=last", "kimg=0.02", "model.generator.execution=official"], output_dir=out
    )
    train(cfg)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_resume_from_a_bad_file_is_one_line(tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"state_dict": {}}, bad)  # a Lightning-like file galip did not write
    else:
        bad.write_bytes(content)
    cfg = compose_config([*SMOKE, f"ckpt_path={bad}"], output_dir=tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"ckpt_path=.*bad\.ckpt.* is not a (readable|galip training) checkpoint"
    ):
        train(cfg)


def test_resume_removes_the_half_written_checkpoint_a_killed_run_left(smoke_run):
    """A kill during a save leaves ``.last.ckpt.<pid>.tmp`` (as large as a checkpoint); the resume removes it,
    while a live writer's temporary file stays."""
    dead, live = (
        smoke_run / "checkpoints" / ".last.ckpt.999999999.tmp",
        smoke_run / "checkpoints" / f".x.ckpt.{os.getpid()}.tmp",
    )
    dead.write_bytes(b"half"), live.write_bytes(b"busy")
    train(compose_config([*SMOKE, "ckpt_path=last", "kimg=0.02"], output_dir=smoke_run))
    assert not dead.exists() and live.exists()


def test_the_wandb_logger_does_not_pass_the_setting_wandb_warns_about():
    """W&B prints "The anonymous setting has no effect" for anonymous=None, which Lightning always passes."""
    from galip.loggers import WandbLogger

    assert "anonymous" not in WandbLogger(offline=True, save_dir="unused")._wandb_init
    assert WandbLogger(offline=True, save_dir="unused", anonymous=True)._wandb_init["anonymous"] == "allow"
