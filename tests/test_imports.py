"""Imports go one way: the package's import graph (read from the source, imports inside
functions included) has no cycle, and each side of the pipeline imports only what it needs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "deblur"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports, and the packages whose ``__init__`` that runs."""
    targets = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    found = set()
    for target in targets:
        parts = target.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & MODULES.keys()
    return found - {name}


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def find_cycle() -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(GRAPH):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    assert "deblur.loading.contract" in GRAPH["deblur.loading.loader"]
    assert "deblur.loading.dali_backend" in GRAPH["deblur.loading.loader"]  # an import inside a function
    assert "deblur.shard" in GRAPH["deblur.shard.build"]  # a package's __init__ runs first


def test_no_import_cycle():
    assert find_cycle() is None, f"import cycle: {' -> '.join(find_cycle())}"


def test_a_cycle_would_be_found(monkeypatch):
    monkeypatch.setitem(GRAPH, "deblur.shard.format", GRAPH["deblur.shard.format"] | {"deblur.loading.contract"})
    assert find_cycle() is not None


@pytest.mark.parametrize("module", ["deblur.models", "deblur.norm", "deblur.metrics"])
def test_models_and_their_math_import_no_data_or_training(module):
    assert not {m for m in reachable(module) if m.startswith(("deblur.shard", "deblur.loading", "deblur.training"))}


@pytest.mark.parametrize("module", ["deblur.infer", "deblur.evaluate", "deblur.export", "deblur.weights"])
def test_the_use_side_imports_no_loader_backend_and_no_training(module):
    forbidden = {
        "deblur.loading.loader",
        "deblur.loading.dali_backend",
        "deblur.loading.dali_graph",
        "deblur.loading.torch_backend",
    }
    found = reachable(module)
    assert not found & forbidden and not {m for m in found if m.startswith("deblur.training")}, sorted(found)


def test_layers_point_one_way():
    """shard <- loading <- training: the builder knows nothing of how it is read or trained on."""
    for name in GRAPH:
        found = reachable(name)
        if name.startswith("deblur.shard"):
            assert not {m for m in found if m.startswith(("deblur.loading", "deblur.training"))}, name
        if name.startswith("deblur.loading"):
            assert not {m for m in found if m.startswith("deblur.training")}, name
