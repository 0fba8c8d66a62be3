"""The layers contract covers every module, and the import graph has no circle.

`make lint` runs import-linter with the contract in pyproject.toml; these tests
check what the contract itself cannot: that no module of proxy/ escapes it, and
that no import chain, type-only imports included, leads back to where it began.
"""

from __future__ import annotations

import tomllib

import grimp
import pytest

from .conftest import ROOT

pytestmark = pytest.mark.unit

PACKAGES = {"proxy", "proxy.http", "proxy.admin"}  # __init__ files with no code of note


def _contract() -> dict:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = doc["tool"]["importlinter"]["contracts"]
    return contract


def _layer_of(module: str, layers: list[list[str]]) -> int | None:
    name = module.removeprefix("proxy.")
    for index, layer in enumerate(layers):
        for member in layer:
            if name == member or name.startswith(member + "."):
                return index
    return None


def test_every_module_of_the_package_sits_in_one_layer_of_the_contract():
    contract = _contract()
    layers = [[m.strip() for m in line.split("|")] for line in contract["layers"]]
    graph = grimp.build_graph("proxy")
    unlisted = sorted(
        m for m in graph.modules if m not in PACKAGES and _layer_of(m, layers) is None
    )
    assert unlisted == []
    listed = [m for layer in layers for m in layer]
    assert len(listed) == len(set(listed)), "a module is listed twice"


def _circles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_the_import_graph_has_no_circle_type_only_imports_included():
    graph = grimp.build_graph("proxy")  # grimp reads `if TYPE_CHECKING:` imports too
    assert _circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    graph = grimp.ImportGraph()
    for name in ("a", "a.b", "a.c", "a.d"):
        graph.add_module(name)
    graph.add_import(importer="a.b", imported="a.c")
    graph.add_import(importer="a.c", imported="a.b")
    graph.add_import(importer="a.d", imported="a.b")
    assert _circles(graph) == [["a.b", "a.c"]]


# The data plane: the listen, exchange and wire layers (README, "The layers").
DATA_PLANE = ("http", "forward.py", "leg.py", "mirror.py", "shared.py")
MAX_CLASS_LINES = 250


def test_no_class_of_the_data_plane_is_over_250_lines():
    import ast

    found = {}
    for entry in DATA_PLANE:
        path = ROOT / "proxy" / entry
        for source in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.ClassDef):
                    found[f"{source.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert "forward.py:Exchange" in found and "h2.py:H2Client" in found  # it looked
    over = {name: n for name, n in found.items() if n > MAX_CLASS_LINES}
    assert over == {}
