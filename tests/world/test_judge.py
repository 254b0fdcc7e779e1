"""The embedded world's judge: shapes, the accuracy definition, judge-FD, training, files and the callback."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import pytest
import torch
from torch import nn

from galip.callbacks import PeriodicEvaluation
from galip.metrics import Subject
from galip.world.evaluator import JudgeEvaluator
from galip.world.judge import (
    ATTRIBUTES,
    VOCAB,
    Judge,
    attribute_accuracy,
    evaluate_generator,
    evaluate_judge,
    judge_fd,
    load_judge,
    render_split,
    save_judge,
    to_unit_range,
    train_judge,
)
from galip.world.scenes import ShapesWorld, World


@pytest.fixture(scope="module")
def random_judge():
    torch.manual_seed(0)
    return Judge().eval()


@pytest.fixture(scope="module")
def val_world():
    return ShapesWorld(seed=0, split="val", length=96, image_size=64)


@pytest.fixture(scope="module")
def val_images(val_world):
    return to_unit_range(render_split(val_world)[0])


@pytest.fixture(scope="module")
def short_training():
    """200 small steps on 2000 scenes (~13 s on 2 cores): not a real judge, but far above chance."""
    config = {"steps": 200, "n_train": 2000, "n_val": 200, "batch_size": 32, "seed": 0}
    return train_judge(config, log=None)


def perfect_generator(world: ShapesWorld):
    """A 'generator' that draws exactly the captioned scene (captions name every attribute)."""
    by_caption = {world[i]["caption"]: world[i]["image"] for i in range(len(world))}
    return lambda captions, noise: torch.stack([by_caption[c] for c in captions])


# --------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 32, 224])
def test_forward_shapes_any_input_size(random_judge, size):
    x = torch.rand(2, 3, size, size) * 2 - 1
    logits = random_judge(x)
    for name in ATTRIBUTES:
        assert logits[name].shape == (2, 3, len(VOCAB[name]))
    assert logits["background"].shape == (2, len(VOCAB["background"]))
    assert logits["n_objects"].shape == (2, len(VOCAB["n_objects"]))
    assert random_judge.features(x).shape == (2, random_judge.feature_dim)
    assert 128 <= random_judge.feature_dim <= 256
    pred = random_judge.predict(x)
    assert pred["colour"].shape == (2, 3) and pred["background"].shape == (2,)


# --------------------------------------------------------------------------------------------------------
# Attribute accuracy
# --------------------------------------------------------------------------------------------------------
def _labels(rows):
    """rows: per image, a list of (shape, colour, size, position) per object, padded with -1 slots."""
    padded = [r + [(-1, -1, -1, -1)] * (3 - len(r)) for r in rows]
    t = torch.tensor(padded)  # [B, 3, 4]
    return {a: t[..., i] for i, a in enumerate(ATTRIBUTES)}


def test_accuracy_perfect_is_one_and_empty_slots_ignored():
    target = _labels([[(0, 1, 0, 0)], [(1, 2, 1, 1), (2, 3, 0, 4)]])
    pred = {k: v.clone() for k, v in target.items()}
    for k in pred:  # garbage in the target's empty slots must not matter
        pred[k][target[k] == -1] = 3
    acc = attribute_accuracy(pred, target)
    assert acc["judge/acc"] == acc["judge/scene_acc"] == 1.0
    assert all(acc[f"judge/acc_{a}"] == 1.0 for a in ATTRIBUTES)


def test_accuracy_exact_fractions():
    # 3 objects in total (1 + 2); 4 attributes each -> 12 (slot, attribute) pairs
    target = _labels([[(0, 1, 0, 0)], [(1, 2, 1, 1), (2, 3, 0, 4)]])
    pred = {k: v.clone() for k, v in target.items()}
    pred["colour"][0, 0] = 7  # image 0: colour wrong
    pred["colour"][1, 1] = 0  # image 1, second object: colour wrong
    pred["position"][1, 0] = 2  # image 1, first object: position wrong
    acc = attribute_accuracy(pred, target)
    assert acc["judge/acc_colour"] == pytest.approx(1 / 3)
    assert acc["judge/acc_position"] == pytest.approx(2 / 3)
    assert acc["judge/acc_shape"] == acc["judge/acc_size"] == 1.0
    assert acc["judge/acc"] == pytest.approx(9 / 12)  # the mean of the four = the pooled pair fraction
    assert acc["judge/scene_acc"] == 0.0
    pred["colour"][0, 0] = 1
    assert attribute_accuracy(pred, target)["judge/scene_acc"] == 0.5


ONE_PLACE = World(positions=("centre",), max_objects=1, sizes={"small": 0.2, "large": 0.3})


def test_accuracy_in_a_one_place_world_leaves_out_position():
    """A world with one place never names it: no acc_position, and acc is the mean of the attributes named."""
    assert ONE_PLACE.named == ("shape", "colour", "size")
    t = torch.tensor([[(0, 1, 0, 0)], [(1, 2, 1, 0)], [(2, 3, 0, 0)], [(3, 0, 1, 0)]])  # [B=4, 1 slot, 4]
    target = {a: t[..., i] for i, a in enumerate(ATTRIBUTES)}
    pred = {k: v.clone() for k, v in target.items()}
    pred["colour"][0, 0] = 5  # one colour wrong in four: 3/4
    pred["shape"][1:3, 0] = 0  # two shapes wrong (image 1, 2): 2/4
    pred["position"][:] = 3  # a position head's answer is not asked
    acc = attribute_accuracy(pred, target, attributes=ONE_PLACE.named)
    assert "judge/acc_position" not in acc
    assert {k for k in acc if k.startswith("judge/acc_")} == {
        "judge/acc_colour",
        "judge/acc_shape",
        "judge/acc_size",
    }
    assert acc["judge/acc_colour"] == 0.75 and acc["judge/acc_shape"] == 0.5 and acc["judge/acc_size"] == 1.0
    assert acc["judge/acc"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert acc["judge/scene_acc"] == 0.25  # only image 3 is right in every named attribute
    full = attribute_accuracy(pred, target)  # the full world's four: position counts (and is all wrong)
    assert full["judge/acc_position"] == 0.0 and full["judge/acc"] == pytest.approx((0.75 + 0.5 + 1.0) / 4)


def test_a_judge_of_another_world_has_that_worlds_heads_and_keeps_it_in_its_file(tmp_path):
    torch.manual_seed(0)
    judge = Judge(32, widths=(8, 16), feature_dim=16, hidden_dim=16, world=ONE_PLACE).eval()
    assert (
        judge.slots == 1
        and judge.vocab == ONE_PLACE.vocab()
        and judge.config["world"] == ONE_PLACE.as_config()
    )
    logits = judge(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert logits["shape"].shape == (2, 1, len(ONE_PLACE.shapes)) and logits["position"].shape == (2, 1, 1)
    assert logits["n_objects"].shape == (2, 2)
    assert "world" not in Judge(32, widths=(8, 16), feature_dim=16, hidden_dim=16).config  # the full world's
    loaded = load_judge(save_judge(tmp_path / "judge.pt", judge))
    assert loaded.world == ONE_PLACE and loaded.slots == 1
    world = ShapesWorld(0, "val", 16, 32, ONE_PLACE)
    metrics = evaluate_judge(loaded, world, batch_size=8)
    assert "judge/acc_position" not in metrics and "judge/acc_size" in metrics
    assert metrics == evaluate_judge(judge, world, batch_size=8)
    # a file whose vocabulary is not its world's is refused
    payload = torch.load(tmp_path / "judge.pt", weights_only=True)
    payload["vocab"]["shape"] = ["circle", "square", "triangle", "cross"]
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="vocabulary"):
        load_judge(tmp_path / "bad.pt")


def test_the_evaluator_refuses_a_judge_of_another_world(tmp_path):
    torch.manual_seed(0)
    small = {"widths": (8, 16), "feature_dim": 16, "hidden_dim": 16}
    one_place = save_judge(tmp_path / "one_place" / "judge.pt", Judge(32, **small, world=ONE_PLACE))
    full = save_judge(tmp_path / "full" / "judge.pt", Judge(32, **small))
    for path, world in ((one_place, None), (one_place, World(max_objects=1)), (full, ONE_PLACE)):
        with pytest.raises(ValueError, match="reads another world"):
            JudgeEvaluator(path, n_samples=4, image_size=32, world=world).judge()
    # the same world, given as a config's mapping, is accepted
    evaluator = JudgeEvaluator(
        one_place, n_samples=4, batch_size=4, image_size=32, world=ONE_PLACE.as_config()
    )
    assert evaluator.judge().world == ONE_PLACE
    assert JudgeEvaluator(full, n_samples=4, image_size=32).judge().world.is_full


def test_accuracy_scene_heads_optional():
    target = _labels([[(0, 1, 0, 0)], [(1, 2, 1, 1)]])
    target.update(background=torch.tensor([0, 1]), n_objects=torch.tensor([1, 1]))
    pred = {**target, "background": torch.tensor([0, 0]), "n_objects": torch.tensor([1, 1])}
    acc = attribute_accuracy(pred, target)
    assert acc["judge/acc_background"] == 0.5 and acc["judge/acc_count"] == 1.0
    assert acc["judge/acc"] == 1.0  # the scene heads do not enter the attribute accuracy


# --------------------------------------------------------------------------------------------------------
# Judge-FD (torchmetrics with the judge as feature extractor)
# --------------------------------------------------------------------------------------------------------
def test_judge_fd_self_zero_shifted_positive(random_judge, val_images):
    fd = judge_fd(random_judge)
    fd.update(val_images, real=True)
    fd.update(val_images, real=False)
    same = fd.compute().item()
    fd.reset()
    noisy = (
        val_images + 0.5 * torch.randn(val_images.shape, generator=torch.Generator().manual_seed(0))
    ).clamp(-1, 1)
    fd.update(val_images, real=True)
    fd.update(noisy, real=False)
    different = fd.compute().item()
    spread = random_judge.features(val_images).var(0).sum().item()  # a random judge's features are tiny
    assert abs(same) < 1e-4 * different
    assert different > spread  # the noise moves the set further than real images spread
    assert not random_judge.training and all(not p.grad for p in random_judge.parameters())


def test_judge_fd_accepts_other_sizes(random_judge, val_images):
    fd = judge_fd(random_judge)
    fd.update(val_images, real=True)
    fd.update(nn.functional.interpolate(val_images, size=224, mode="nearest"), real=False)
    assert fd.compute().item() < 1.0  # nearest upsampling then antialiased downsampling is almost lossless


# --------------------------------------------------------------------------------------------------------
# Training, files, evaluation of a generator
# --------------------------------------------------------------------------------------------------------
def test_short_training_beats_chance(short_training):
    judge, metrics = short_training
    assert not judge.training
    # chance: colour 1/8, shape 1/4, size 1/2, position ~1/3 -> acc ~0.3. Position is learnt first,
    # colour next (seed 0 reaches ~0.55 here, ~0.99 with the full 1600 steps), shape last.
    assert metrics["judge/acc_position"] > 0.9
    assert metrics["judge/acc_colour"] > 0.3
    assert metrics["judge/acc"] > 0.5


def test_save_load_round_trip(short_training, tmp_path, val_images):
    judge, metrics = short_training
    path = save_judge(tmp_path / "sub" / "judge.pt", judge, metrics, {"steps": 100})
    loaded = load_judge(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded.features(val_images), judge.features(val_images))
        assert all(
            torch.equal(a, b)
            for a, b in zip(loaded(val_images).values(), judge(val_images).values(), strict=True)
        )
    payload = torch.load(path, weights_only=True)
    assert payload["vocab"]["colour"] == list(VOCAB["colour"])
    assert payload["metrics"]["judge/acc"] == pytest.approx(metrics["judge/acc"])


def test_missing_judge_file_names_path(tmp_path):
    missing = tmp_path / "nowhere" / "judge.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_judge(missing)


def test_evaluate_generator_perfect_generator(short_training, val_world):
    judge, _ = short_training
    metrics = evaluate_generator(perfect_generator(val_world), val_world, judge, n=64, batch_size=24, seed=3)
    on_real = evaluate_judge(judge, ShapesWorld(0, "val", 64, 64))
    for key, value in on_real.items():  # a perfect generator scores exactly the judge's own accuracy
        assert metrics[key] == pytest.approx(value)
    assert abs(metrics["judge/fd"]) < 1e-3
    assert metrics["judge/n"] == 64


def test_evaluate_generator_deterministic(random_judge, val_world):
    proj = nn.Conv2d(1, 3, 1)

    def generate(captions, noise):  # a stand-in generator: noise -> 16x16 image
        with torch.no_grad():
            return torch.tanh(
                proj(noise[:, :64].reshape(-1, 1, 8, 8).repeat_interleave(2, -1).repeat_interleave(2, -2))
            )

    runs = [
        evaluate_generator(generate, val_world, random_judge, n=40, batch_size=16, seed=s, nz=64)
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1]
    assert runs[0]["judge/fd"] != runs[2]["judge/fd"]
    assert runs[0]["judge/fd"] > 0


# --------------------------------------------------------------------------------------------------------
# The callback, in a real (tiny) Trainer
# --------------------------------------------------------------------------------------------------------
class FakeGenerator(nn.Module):
    nz = 16

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(self.nz, 3 * 8 * 8)

    def forward(self, noise):
        return torch.tanh(self.fc(noise)).reshape(-1, 3, 8, 8)


class FakeGALIP(L.LightningModule):
    """What the evaluation callback needs from GALIPModule: generate(captions, noise), generator.nz, images_seen."""

    def __init__(self):
        super().__init__()
        self.generator = FakeGenerator()
        self.images_seen = 0

    def training_step(self, batch, batch_idx):
        self.images_seen += batch[0].shape[0]
        return self.generator(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 16)), batch_size=4)

    @torch.no_grad()
    def generate(self, captions, noise):
        return self.generator(noise.to(self.device))


def test_the_judge_in_the_evaluation_callback_writes_jsonl(random_judge, tmp_path):
    judge_path = save_judge(tmp_path / "judge.pt", random_judge)
    evaluator = JudgeEvaluator(judge_path, n_samples=12, batch_size=5)
    callback = PeriodicEvaluation(evaluator, every_n_kimg=0.008, log_dir=tmp_path / "eval")  # every 2 batches
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger(tmp_path / "logs"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(FakeGALIP())
    lines = [json.loads(line) for line in (tmp_path / "eval" / "evaluation.jsonl").read_text().splitlines()]
    # after batches 2 and 4; the end of training is batch 4, already scored, so not judged twice
    assert [line["batch"] for line in lines] == [2, 4]
    assert [line["kimg"] for line in lines] == [0.008, 0.016]
    expected = {"eval/judge/acc", "eval/judge/acc_colour", "eval/judge/scene_acc", "eval/judge/fd"}
    assert expected <= set(lines[0]["metrics"])
    assert "eval/judge/acc" in trainer.callback_metrics
    logged = (tmp_path / "logs").rglob("metrics.csv")
    assert any("eval/judge/fd" in path.read_text() for path in logged)
    # the same evaluator, called as galip.evaluate calls it, gives the same numbers
    fake = FakeGALIP()
    fake.generator.load_state_dict(trainer.lightning_module.generator.state_dict())
    subject = Subject(fake.generate, fake.generator.nz, torch.device("cpu"))
    again = evaluator(subject)
    assert again["judge/acc"] == lines[-1]["metrics"]["eval/judge/acc"]


# --------------------------------------------------------------------------------------------------------
# The command line and the cache
# --------------------------------------------------------------------------------------------------------
TINY = {"steps": 3, "n_train": 64, "n_val": 16, "batch_size": 16}


def test_ensure_judge_trains_once_then_reuses(tmp_path, monkeypatch, capsys):
    from galip.world.artefacts import ensure_judge

    monkeypatch.setenv("GALIP_CACHE", str(tmp_path))
    path = ensure_judge(TINY)
    assert path.is_file() and path.parent.parent == tmp_path / "judge"
    assert {"config.json", "metrics.json"} <= {p.name for p in path.parent.iterdir()}
    mtime = path.stat().st_mtime_ns
    assert ensure_judge(TINY) == path and path.stat().st_mtime_ns == mtime
    assert "cached" in capsys.readouterr().out
    assert ensure_judge({**TINY, "seed": 1}) != path  # another config, another artefact
    load_judge(path)
    with pytest.raises(KeyError, match="stepz"):
        ensure_judge({"stepz": 1})


def test_cli_writes_out(tmp_path, monkeypatch, capsys):
    from galip.world.judge import DEFAULT_TRAIN_CONFIG
    from galip.world.train_judge import main

    for key, value in TINY.items():
        monkeypatch.setitem(DEFAULT_TRAIN_CONFIG, key, value)
    metrics = main(["--out", str(tmp_path / "j" / "judge.pt"), "--steps", "2", "--seed", "1"])
    assert (tmp_path / "j" / "judge.pt").is_file()
    assert "judge/acc" in metrics and "judge/acc:" in capsys.readouterr().out
    assert torch.load(tmp_path / "j" / "judge.pt", weights_only=True)["train_config"]["steps"] == 2


def test_confusion_counts_target_against_prediction_on_present_slots():
    from galip.world.judge import EMPTY, confusion

    target = torch.tensor([[0, 2, EMPTY], [3, EMPTY, EMPTY]])
    pred = torch.tensor([[0, 1, 3], [3, 2, 0]])  # the empty slots' predictions must not count
    counts = confusion(pred, target, 4)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0, 0] = expected[2, 1] = expected[3, 3] = 1
    assert torch.equal(counts, expected)
