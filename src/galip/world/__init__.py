"""The embedded shapes world: GALIP on a laptop CPU.

A CPU-sized stand-in for CC12M, so a person without a GPU can watch GALIP learn: procedural captioned scenes
(`scenes`), a tiny CLIP pretrained on them (`tiny_clip`; ``python -m galip.world.pretrain_clip``; shipped in
``assets/``), an independent judge that scores generated images per attribute (`judge`; ``python -m
galip.world.train_judge``), the artefacts built on first use and cached (`artefacts`, `cache`), its evaluator for the training callback
and ``galip.evaluate`` (`evaluator`), probes of CLIPs and discriminators (`probe`) and a supervised ceiling
(`oracle_decoder`). Its configs live in ``conf/`` beside this file, on the root configs' search path.

The world is a user of the framework, like CUB or COCO: it imports the framework, never the other way round.
It plugs in through config only: ``_target_``s (``galip.world.ShapesDataModule``, ``galip.world.JudgeEvaluator``)
and values computed by ``${galip.call:galip.world.<function>}`` (`artefacts`).
"""

from galip.world.artefacts import ensure_judge, ensure_shapes_shards, judge_file, shapes_clip, shapes_shards
from galip.world.evaluator import JudgeEvaluator
from galip.world.scenes import ShapesDataModule, ShapesWorld, World

__all__ = [
    "JudgeEvaluator",
    "ShapesDataModule",
    "ShapesWorld",
    "ensure_judge",
    "ensure_shapes_shards",
    "judge_file",
    "World",
    "shapes_clip",
    "shapes_shards",
]
