"""The package's layout (DESIGN.md §8): no import circle, backends that import only `_call`,
and every loss declared once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gpuloss as gl

PACKAGE = Path(gl.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ("gpuloss", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules) -> set[str]:
    """Every gpuloss module `name` imports, at module level or inside a function, including
    importlib.import_module("gpuloss....") calls. A parent package imported implicitly along
    with a submodule is not counted (every module would then import gpuloss/__init__)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()

    def add(target):
        if target in modules:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            add(node.args[0].value)
    found.discard(name)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a circle planted in a copy of the graph is found."""
    graph = _graph()
    graph["gpuloss._call"] = graph["gpuloss._call"] | {"gpuloss._api"}
    assert _cycle(graph) is not None


def test_call_imports_nothing_of_gpuloss():
    assert _graph()["gpuloss._call"] == set()


@pytest.mark.parametrize("backend", ["numpy", "cuda", "generic"])
def test_backends_import_only_call(backend):
    allowed = {"gpuloss._call", "gpuloss._pool"}  # _pool: a leaf (NumPy buffers), no gpuloss
    assert _graph()[f"gpuloss.backends.{backend}"] <= allowed
    assert _graph()["gpuloss._pool"] == set()


def test_every_public_loss_is_declared_in_the_losses_package():
    for name, loss in gl.LOSSES.items():
        assert getattr(gl, name) is loss
        family_module = {"elementwise": ("regression", "binary"), "categorical": ("categorical",)}
        homes = [m for m in family_module[loss.family]
                 if getattr(__import__(f"gpuloss.losses.{m}", fromlist=["x"]), name, None)
                 is loss]
        assert len(homes) == 1, name
