"""The judge as an evaluator of the framework (`galip.metrics.protocol.Evaluator`): the periodic evaluation
callback (``+callbacks/evaluation=judge``, the demo's ``callbacks.evaluation``) and ``galip.evaluate data=shapes``
both run it, so the numbers logged during training and those printed after it are one measurement."""

from __future__ import annotations

from pathlib import Path

from galip.metrics.protocol import Subject
from galip.world.artefacts import ensure_judge
from galip.world.judge import Judge, evaluate_generator, load_judge
from galip.world.scenes import ShapesWorld


class JudgeEvaluator:
    """``judge/acc``, ``judge/acc_<attribute>``, ``judge/fd``, … on the first ``n_samples`` scenes of a split.

    Args:
        judge_path: a ``judge.pt`` (`galip.world.train_judge`); ``None``: the default judge, trained on first use.
        n_samples: scenes judged (one image each, the same noise every time: ``seed``).
        batch_size: generation batch size.
        split, world_seed, image_size, max_objects: the scenes whose captions condition G (the data's
            ``max_objects``, so a run is judged on the kind of scene it trains on).
    """

    def __init__(
        self,
        judge_path: str | Path | None = None,
        n_samples: int = 256,
        batch_size: int = 64,
        split: str = "val",
        world_seed: int = 0,
        image_size: int = 64,
        seed: int = 0,
        max_objects: int = 3,
    ):
        self.judge_path, self.n_samples, self.batch_size, self.seed = judge_path, n_samples, batch_size, seed
        self.world = ShapesWorld(world_seed, split, n_samples, image_size, max_objects)
        self._judge: Judge | None = None

    def judge(self) -> Judge:
        if self._judge is None:
            if self.judge_path is None:
                self.judge_path = ensure_judge()  # trains on first use when nothing is cached
            self._judge = load_judge(self.judge_path)
        return self._judge

    def __call__(self, subject: Subject) -> dict[str, float]:
        judge = self.judge().to(subject.device)
        return evaluate_generator(
            subject.generate, self.world, judge, self.n_samples, self.batch_size, self.seed, subject.nz
        )
