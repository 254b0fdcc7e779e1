"""The judge as an evaluator of the framework (`galip.metrics.protocol.Evaluator`): the periodic evaluation
callback (``+callbacks/evaluation=judge``, the demo's ``callbacks.evaluation``) and ``galip.evaluate data=shapes``
both run it, so the numbers logged during training and those printed after it are one measurement."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from galip.metrics.protocol import Subject
from galip.world.artefacts import ensure_judge, world_judge_config
from galip.world.judge import Judge, evaluate_generator, load_judge
from galip.world.scenes import ShapesWorld, World


class JudgeEvaluator:
    """``judge/acc``, ``judge/acc_<attribute>``, ``judge/fd``, … on the first ``n_samples`` scenes of a split.

    Args:
        judge_path: a ``judge.pt`` (`galip.world.train_judge`); ``None``: the default judge, trained on first use.
        n_samples: scenes judged (one image each, the same noise every time: ``seed``).
        batch_size: generation batch size.
        split, world_seed, image_size, world: the scenes whose captions condition G (the data's world, so a
            run is judged on the kind of scene it trains on; the judge must have been trained on it).
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
        world: World | Mapping[str, Any] | None = None,
    ):
        self.judge_path, self.n_samples, self.batch_size, self.seed = judge_path, n_samples, batch_size, seed
        self.world = ShapesWorld(world_seed, split, n_samples, image_size, world)
        self._judge: Judge | None = None

    def judge(self) -> Judge:
        if self._judge is None:
            if self.judge_path is None:
                self.judge_path = ensure_judge(world_judge_config(self.world.world, self.world.image_size))
            judge = load_judge(self.judge_path)
            if judge.world != self.world.world:
                raise ValueError(
                    f"the judge at {self.judge_path} reads another world than the one judged "
                    f"({judge.world.key() or 'the full world'} vs {self.world.world.key() or 'the full world'})"
                )
            self._judge = judge
        return self._judge

    def __call__(self, subject: Subject) -> dict[str, float]:
        judge = self.judge().to(subject.device)
        return evaluate_generator(
            subject.generate, self.world, judge, self.n_samples, self.batch_size, self.seed, subject.nz
        )
