"""Two CPU processes (gloo DDP) train on converter-made shards through the real entry point."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from galip.data.make_shards import convert
from tests.helpers import corrupt_shard, make_cub

TESTS = Path(__file__).parent


def test_two_ranks_train_equal_batches_on_different_data_with_different_noise(tmp_path):
    make_cub(tmp_path / "birds", n_train=12)
    convert("cub", tmp_path / "birds", tmp_path / "shards", max_per_shard=3)
    shards = tmp_path / "shards" / "train"  # 4 shards of 3 images
    corrupt_shard(shards / "00004.tar", n_good=2)  # and a corrupt one, to count skips over ranks
    probe = tmp_path / "probe"
    args = [
        "+experiment=cc12m",
        "clip=tiny",
        "trainer=ddp",  # the multi-GPU config itself, on two CPU processes (gloo)
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32",
        "kimg=0.012",  # 12 images over both ranks: 3 batches of 2 each (the run length in kimg under DDP)
        "trainer.log_every_n_steps=1",
        f"data.shards={shards}/{{00000..00004}}.tar",  # unquoted, as a shell passes it on
        "data.num_workers=1",
        "data.batch_size=2",
        "data.epoch_samples=12",  # 3 batches per rank
        "data.shuffle_buffer=0",
        "callbacks.sample_grid.every_n_kimg=0",
        "callbacks.checkpoint.every_n_kimg=null",
        "model.ema_half_life_kimg=0.01",
        "+callbacks.probe._target_=ddp_probe.RankProbe",
        f"+callbacks.probe.out={probe}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "GALIP_ROOT": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "galip.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert [r["batches"] for r in ranks] == [3, 3]  # equal batch counts: no rank waits at the epoch's end
    assert ranks[0]["keys"] != ranks[1]["keys"]  # shards resampled per rank
    assert ranks[0]["noise"] != ranks[1]["noise"]  # per-rank noise (the official code draws the same)
    assert all(r["images_seen"] == 3 * 2 * 2 for r in ranks)  # images seen count every rank
    # after three steps on different data the ranks hold bit-identical G, D, EMA and Adam states ...
    assert ranks[0]["end_hashes"] == ranks[1]["end_hashes"]
    assert set(ranks[0]["end_hashes"]) == {"generator", "discriminator", "generator_ema"}
    assert ranks[0]["adam_hashes"] == ranks[1]["adam_hashes"] and len(ranks[0]["adam_hashes"]) == 2
    # ... which did move (and started equal: rank 0's initial weights are broadcast)
    assert ranks[0]["start_hashes"] == ranks[1]["start_hashes"]
    assert all(ranks[0]["start_hashes"][k] != v for k, v in ranks[0]["end_hashes"].items())
    # data/skipped is the sum over ranks (and workers) of the skips each one met
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    logged = [float(r["data/skipped"]) for r in rows if r.get("data/skipped")]
    assert logged[-1] == sum(r["skipped"] for r in ranks)
