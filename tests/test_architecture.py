"""The layers of docs/architecture.md hold: no module imports from a layer below it in the list, so
there is no import loop through the layers, and only the composition and command layers know Hydra."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "metalearn"
# docs/architecture.md's table: the layer of each top-level module or package of metalearn.
LAYERS = {
    1: ("checks", "stats", "objectives", "tasks", "runtime", "distributed", "checkpoint"),
    2: ("data", "rl", "l2o"),
    3: ("models",),
    4: ("algorithms",),
    5: ("metrics", "rundir", "trainer"),
    6: ("compose", "resolvers", "run"),
    7: ("cli", "messages", "help", "train", "evaluate", "report", "reproduction"),
}
LAYER = {name: layer for layer, names in LAYERS.items() for name in names}
ALLOWED: set[tuple[str, str]] = set()
HYDRA_LAYERS = (6, 7)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: Path) -> list[str]:
    """Every module `path` imports (absolute names), at any depth of the file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def _top(module: str) -> str:
    return module.split(".")[0]


def test_every_module_has_a_layer() -> None:
    tops = {_top(_module(p)) for p in ROOT.rglob("*.py") if _module(p)}
    assert tops - set(LAYER) == set(), "a new top-level module needs a layer here and in docs/architecture.md"


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        here = _top(_module(path)) if _module(path) else None
        if here is None:
            continue
        for name in _imports(path):
            if not name.startswith("metalearn.") or (here, _top(name[len("metalearn."):])) in ALLOWED:
                continue
            there = _top(name[len("metalearn."):])
            if LAYER[there] > LAYER[here]:
                upward.append(f"{path.relative_to(ROOT.parent)} (layer {LAYER[here]}) imports {name} "
                              f"(layer {LAYER[there]})")
    assert upward == []


def test_no_module_loop_within_a_package() -> None:
    """Modules of one package do not import each other both ways (not even for type checking)."""
    edges = set()
    for path in ROOT.rglob("*.py"):
        for name in _imports(path):
            if name.startswith("metalearn."):
                edges.add((f"metalearn.{_module(path)}", name))
    assert sorted((a, b) for a, b in edges if a < b and (b, a) in edges) == []


def test_only_composition_and_commands_know_hydra() -> None:
    knowing = sorted(str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py") if _module(p)
                     and LAYER[_top(_module(p))] not in HYDRA_LAYERS
                     and any(_top(n) in ("hydra", "omegaconf") for n in _imports(p)))
    assert knowing == []
