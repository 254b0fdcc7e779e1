"""The house rules, read from the import graph of the package itself, and the old spellings that moved."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import galip
from galip.config import register_resolvers

PACKAGE = Path(galip.__file__).resolve().parent


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports (``from a.b import c`` counts ``a.b`` and ``a.b.c`` when known)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & known


MODULES = modules()
GRAPH = {name: imports(path, set(MODULES)) - {name} for name, path in MODULES.items()}
ENTRY_POINTS = {name for name, path in MODULES.items() if 'if __name__ == "__main__"' in path.read_text()}


def test_nothing_outside_the_world_wing_imports_it():
    offenders = {
        name: sorted(d for d in deps if d.startswith("galip.world"))
        for name, deps in GRAPH.items()
        if not name.startswith("galip.world")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_loops():
    """Depth-first search for a cycle through non-package modules (a package __init__ re-exports)."""
    plain = {n for n, p in MODULES.items() if p.name != "__init__.py"}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node] & plain):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(plain):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_entry_point_is_imported_as_a_library():
    assert "galip.train" in ENTRY_POINTS and "galip.world.pretrain_clip" in ENTRY_POINTS
    importers = {name: sorted(deps & ENTRY_POINTS) for name, deps in GRAPH.items()}
    assert {k: v for k, v in importers.items() if v} == {}


def test_the_framework_has_one_evaluation_callback_and_one_loader():
    callbacks = [p for p in (PACKAGE / "callbacks").glob("*.py") if "PeriodicEvaluation" in p.read_text()]
    assert [p.name for p in callbacks if "class PeriodicEvaluation" in p.read_text()] == ["evaluation.py"]
    loaders = [n for n, p in MODULES.items() if "def load_generator(" in p.read_text()]
    assert sorted(loaders) == ["galip", "galip.loading"]  # galip.load_generator wraps galip.loading's


# ---------------------------------------------------------------------------------------------
# Spellings of earlier releases: each says where it went
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("galip.pretrain_clip", "galip.world.pretrain_clip"),
        ("galip.train_judge", "galip.world.train_judge"),
        ("galip.clip_probe", "galip.world.probe"),
    ],
)
def test_moved_commands_name_their_new_spelling(old, new):
    proc = subprocess.run([sys.executable, "-m", old], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and f"python -m {new}" in proc.stderr and "Traceback" not in proc.stderr


def test_moved_names_say_where_they_went():
    import galip.data
    import galip.train

    with pytest.raises(AttributeError, match=r"galip\.world\.scenes\.ShapesWorld"):
        galip.data.ShapesWorld  # noqa: B018
    with pytest.raises(AttributeError, match=r"galip\.loading\.load_module"):
        galip.train.module_from_run  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        galip.data.nonsense  # noqa: B018


def test_old_resolvers_name_the_new_one():
    register_resolvers(replace=True)
    cfg = OmegaConf.create({"judge": "${galip.judge:}"})
    with pytest.raises(
        Exception, match=r"\$\{galip\.judge:…\} is now \$\{galip\.call:galip\.world\.judge_file\}"
    ):
        OmegaConf.to_container(cfg, resolve=True)
