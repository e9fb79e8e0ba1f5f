"""Public functions of the pure packages document their arguments and results.

DESIGN.md's conventions ask for Google-style docstrings; the project's rule is that every public
function's docstring gives argument shapes and units, what it returns, the errors it raises, and
the paper or source behind each rule or formula.

Only the part a parser can check is checked, by reading the source with :mod:`ast` (nothing is
imported). The rule, for every module that ``ENFORCED`` names (a package folder, walked with its
subfolders, or a single module, relative to ``src/spotpipe``):

* A *public function* is a module-level function, or a method of a module-level public class,
  whose name does not start with ``_``; ``__init__`` counts too, unless its class docstring has
  an ``Args:`` section. Nested functions, properties (``@property``, ``@x.setter``,
  ``@cached_property``) and methods of private classes are not checked.
* A method that implements a ``Protocol`` of these packages is documented on the protocol, so it
  is skipped: its class subclasses the protocol or defines every (non-property) method of it,
  and the method's name is one of the protocol's methods.
* A public function that takes arguments other than ``self``/``cls`` needs a docstring with an
  ``Args:`` section in which every parameter (``*args``/``**kwargs`` by bare name) appears as
  ``name:`` at the start of a line; and, if its return annotation is present and is not
  ``None``, a ``Returns:`` (or ``Yields:``) section.

Units, shapes, errors and sources are for the reader to judge; this test keeps the sections from
going missing.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Packages (folders, walked with their subfolders) and single modules under src/spotpipe whose
# public functions are checked: by now every module of the package (a new package or top-level
# module is added here; test_every_module_is_enforced says when one is missing).
ENFORCED: tuple[str, ...] = (
    "ft", "schedule", "sim", "reliability", "model", "data", "runtime",
    "__init__.py", "__main__.py", "cli.py", "cliargs.py", "config.py", "cost.py", "errors.py", "events.py",
    "faultspec.py", "fsutil.py", "network.py", "planner.py", "progressline.py",
)

PROPERTY_DECORATORS = {"property", "cached_property", "setter", "getter", "deleter"}


@dataclass(frozen=True)
class Offence:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _paths(entry: str) -> list[Path]:
    """The modules one ``ENFORCED`` entry names: a folder's ``*.py`` files, or the one module."""
    path = ROOT / "src" / "spotpipe" / entry
    return [path] if entry.endswith(".py") else list(path.rglob("*.py"))


def _modules(enforced: tuple[str, ...] = ENFORCED) -> list[Path]:
    return sorted({p for entry in enforced for p in _paths(entry)})


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _is_property(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(_decorator_name(d) in PROPERTY_DECORATORS for d in fn.decorator_list)


def _methods(cls: ast.ClassDef) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _base_names(cls: ast.ClassDef) -> set[str]:
    return {_decorator_name(b) for b in cls.bases}


def _protocols(trees: dict[Path, ast.Module]) -> dict[str, set[str]]:
    """Protocol class name -> names of its (non-property) methods, over all scanned modules."""
    found: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and "Protocol" in _base_names(node):
                found[node.name] = {m.name for m in _methods(node) if not _is_property(m)}
    return found


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> list[str]:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    if a.vararg is not None:
        names.append(a.vararg.arg)
    if a.kwarg is not None:
        names.append(a.kwarg.arg)
    if is_method and names and names[0] in ("self", "cls"):
        names = names[1:]
    return names


def _section(doc: str, title: str) -> str | None:
    """The text of the ``title:`` section of a Google-style docstring, or None without one."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"{title}:":
            indent = len(line) - len(line.lstrip())
            body = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt)
            return "\n".join(body)
    return None


def _check(fn: ast.FunctionDef | ast.AsyncFunctionDef, where: str, is_method: bool) -> list[Offence]:
    params = _params(fn, is_method)
    if not params:
        return []
    doc = ast.get_docstring(fn) or ""
    out: list[Offence] = []
    args = _section(doc, "Args")
    if args is None:
        out.append(Offence(where, "no Args: section"))
    else:
        missing = [p for p in params if not re.search(rf"^\s*\**{re.escape(p)}\b[^:\n]*:", args, re.MULTILINE)]
        if missing:
            out.append(Offence(where, f"Args: does not name {', '.join(missing)}"))
    returns = fn.returns
    if returns is not None and not (isinstance(returns, ast.Constant) and returns.value is None):
        if _section(doc, "Returns") is None and _section(doc, "Yields") is None:
            out.append(Offence(where, "no Returns: section"))
    return out


def _offences(enforced: tuple[str, ...] = ENFORCED) -> list[Offence]:
    trees = {p: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in _modules(enforced)}
    protocols = _protocols(trees)
    out: list[Offence] = []
    for path, tree in trees.items():
        rel = path.relative_to(ROOT / "src").with_suffix("").as_posix().replace("/", ".")
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                out += _check(node, f"{rel}.{node.name}", is_method=False)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                methods = _methods(node)
                own = {m.name for m in methods}
                implemented: set[str] = set()
                for proto, names in protocols.items():
                    if proto == node.name:
                        continue
                    if proto in _base_names(node) or (names and names <= own):
                        implemented |= names
                class_args = _section(ast.get_docstring(node) or "", "Args") is not None
                for m in methods:
                    if m.name == "__init__":
                        if class_args:
                            continue
                    elif m.name.startswith("_"):
                        continue
                    if _is_property(m) or m.name in implemented:
                        continue
                    out += _check(m, f"{rel}.{node.name}.{m.name}", is_method=True)
    return out


def test_scan_sees_the_packages() -> None:
    """The walk is not empty and reads every entry (a vacuous pass would hide a wrong path)."""
    modules = {p.as_posix() for p in _modules()}
    for entry in ENFORCED:
        path = (ROOT / "src" / "spotpipe" / entry).as_posix()
        if entry.endswith(".py"):
            assert path in modules, entry
        else:
            assert any(m.startswith(path + "/") for m in modules), entry


def test_every_module_is_enforced() -> None:
    """No module of the package falls outside ``ENFORCED`` (a new package or module is added)."""
    enforced = set(_modules())
    everything = sorted((ROOT / "src" / "spotpipe").rglob("*.py"))
    missing = [p.relative_to(ROOT / "src").as_posix() for p in everything if p not in enforced]
    assert not missing, "modules outside ENFORCED: " + ", ".join(missing)


def test_rule_catches_a_bare_function() -> None:
    """The checker itself: a function without sections is named, a documented one is not."""
    bare = ast.parse("def f(a: int, *rest: int) -> int:\n    '''Nothing.'''\n    return a\n").body[0]
    good = ast.parse(
        "def f(a: int, *rest: int) -> int:\n"
        "    '''Sum.\n\n    Args:\n        a: First.\n        *rest: Others.\n\n"
        "    Returns:\n        The sum.\n    '''\n    return a\n"
    ).body[0]
    assert isinstance(bare, ast.FunctionDef) and isinstance(good, ast.FunctionDef)
    assert [o.what for o in _check(bare, "m.f", False)] == ["no Args: section", "no Returns: section"]
    assert _check(good, "m.f", False) == []


@pytest.mark.timeout(60)
def test_public_functions_document_args_and_returns() -> None:
    offences = _offences()
    assert not offences, f"{len(offences)} public functions lack docstring sections:\n" + "\n".join(map(str, offences))
