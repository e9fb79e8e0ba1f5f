"""No import circles between spotpipe's modules, counting the imports made inside functions too.

An import moved into a function body hides a circle from Python but not from a reader: the two
modules still need each other, and neither can be understood, tested or moved alone. The three
circles this layout removed (``reliability/cli`` and ``report``, ``runtime/cli`` and the worker,
``sim/ftpolicy`` and ``sim/recovery``) were all of that kind, so this test reads every ``import``
statement of every module, wherever it stands (``if TYPE_CHECKING:`` blocks excepted: they never
run), and looks for a cycle in the resulting graph.

:data:`KNOWN` lists the deferred imports that still close a circle, each with the reason it is
there; the test fails when a new circle appears and when a listed one is gone (then delete its
line).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "spotpipe"

KNOWN: dict[tuple[str, str], str] = {}
"""Deferred imports ``(importer, imported)`` that close a circle today, and why."""


def module_name(path: Path) -> str:
    """The dotted module name of a file under ``src/``.

    Args:
        path: A ``.py`` file of the package.

    Returns:
        ``spotpipe.a.b`` for ``src/spotpipe/a/b.py`` and ``spotpipe.a`` for ``a/__init__.py``.
    """
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.AST) -> bool:
    """Whether ``node`` is an ``if TYPE_CHECKING:`` block (its imports never run)."""
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_names(tree: ast.Module) -> list[str]:
    """Dotted names of everything a module imports, at any depth, ``TYPE_CHECKING`` blocks excepted.

    Args:
        tree: The parsed module.

    Returns:
        For ``import a.b``: ``a.b``; for ``from a import b``: ``a`` and ``a.b`` (``b`` may be a
        module or a name in ``a``).
    """
    names: list[str] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        stack.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the spotpipe modules it imports (a package's ``__init__`` is not counted as
    importing its own submodules, which is how a package re-exports them).

    Returns:
        Edges of the import graph over every module of the package.
    """
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported_names(ast.parse(path.read_text(encoding="utf-8"))):
            while imported and imported not in modules:  # a name inside a module: its module
                imported = imported.rpartition(".")[0]
            if imported.startswith("spotpipe") and imported != name and not imported.startswith(name + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm).

    Args:
        graph: Module -> modules it imports.

    Returns:
        Each circle as a sorted list of module names.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_covers_the_package() -> None:
    graph = import_graph()
    assert len(graph) > 100 and "spotpipe.runtime.worker.worker" in graph
    assert "spotpipe.schedule.build" in graph["spotpipe.runtime.worker.worker"]
    assert "spotpipe.planner" in graph["spotpipe.sim.cli"]  # a deferred import is an edge too


def test_a_deferred_import_that_closes_a_circle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_but_the_known_ones() -> None:
    graph = import_graph()
    for (importer, imported) in KNOWN:
        assert imported in graph[importer], f"{importer} no longer imports {imported}: delete its KNOWN line"
        graph[importer].discard(imported)
    assert cycles(graph) == [], "an import circle (imports inside functions count too)"
    for (importer, imported), why in KNOWN.items():
        graph[importer].add(imported)
        assert cycles(graph), f"{importer} -> {imported} no longer closes a circle ({why}): delete its KNOWN line"
        graph[importer].discard(imported)
