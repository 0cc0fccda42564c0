"""The package's import graph: no circles, dependencies pointing one way, tooling at the edge.

Read statically (ast) from the source tree, so it holds for every import, module-level or inside
a function (a lazy import still runs). The circle check counts ``if TYPE_CHECKING:`` imports too;
the one-way rules only what runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"kvcomm": "kvcomm", "store": "kvcomm.store", "kernels": "kvcomm.kernels", "agents": "kvcomm.agents"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if folder == "kvcomm" and parts and parts[0] in ("store", "kernels", "agents"):
                continue
            out[name] = path
    return out


MODULES = _modules()


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, *, typing_only: bool = True) -> set[str]:
    """The modules ``name`` imports (a package's submodule where ``from pkg import submodule``)."""
    tree = ast.parse(path.read_text())
    skip = set() if typing_only else _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found


# every reference, type-only ones included: a circle of annotations is still a circle to a reader
GRAPH = {name: {m for m in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}
# what runs: the one-way rules are about what a module loads
EXTERNAL = {name: _imports(name, path, typing_only=False) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read() -> None:
    assert "kvcomm.engine" in GRAPH and "kvcomm.planner" in GRAPH["kvcomm.engine"]
    assert "kvcomm.store.redis_store" in MODULES and "kvcomm.tools.cli" in MODULES


def test_no_import_circles() -> None:
    assert _cycles() == []


def _importers_of(prefix: str, among: list[str]) -> list[str]:
    return sorted(m for m in among if any(dep == prefix or dep.startswith(prefix + ".") for dep in EXTERNAL[m]))


def _in(*prefixes: str) -> list[str]:
    return [m for m in MODULES if any(m == p or m.startswith(p + ".") for p in prefixes)]


CORE = [m for m in MODULES if not m.startswith(("kvcomm.tools", "kvcomm.agents"))]


def test_the_core_imports_no_tooling_and_no_adapter() -> None:
    assert _importers_of("kvcomm.tools", CORE) == []
    assert _importers_of("kvcomm.agents", CORE) == []


@pytest.mark.parametrize(("modules", "forbidden"), [
    (_in("kvcomm.store"), "transformers"),  # the store never imports transformers
    (_in("kvcomm.kernels"), "transformers"),
    (_in("kvcomm.kernels"), "kvcomm.store"),
    ([m for m in CORE if not m.startswith("kvcomm.store")], "redis"),  # the engine never imports redis
    (_in("kvcomm.fastpath"), "kvcomm.engine"),  # the fast path serves the engine, never the reverse
    (_in("kvcomm.models"), "kvcomm.engine"),
])
def test_dependencies_point_one_way(modules, forbidden) -> None:
    assert _importers_of(forbidden, modules) == []
