"""The wheel holds every subpackage (pyproject.toml lists them). The package's imports
point one way: no module imports, directly or not, one that
imports it back, and nothing in capture/ reaches what sits above it (the replay, the
modes, the runner). Read from the source with ast: imports under `if TYPE_CHECKING:`
run nothing and are left out. A package's __init__ that re-exports its submodules
(sink/, mapping/) is a module like any other: importing a submodule directly is no
import of the package."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "cdc_invalidator"

Graph = dict[str, set[str]]


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def import_graph(package: Path = PACKAGE) -> Graph:
    paths = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: Graph = {}
    for name, path in paths.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in paths else base)
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
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


def reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_finder_sees_a_cycle(tmp_path: Path) -> None:
    """The control: a package whose modules import each other through a third."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("from pkg.c import thing\n")
    (package / "c.py").write_text("import pkg.a\nthing = 1\n")
    (package / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    graph = import_graph(package)
    assert graph["pkg.d"] == set()  # a type-only import is no edge
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph()
    assert "cdc_invalidator.modes.choose" in graph  # the graph is the package's
    assert cycles(graph) == []


def test_capture_reaches_nothing_above_it() -> None:
    graph = import_graph()
    above = {
        f"cdc_invalidator.{name}"
        for name in ("replay", "redis_guard", "second_deletes", "modes", "runner", "listener")
    }
    for module in graph:
        if module.startswith("cdc_invalidator.capture"):
            reached = {
                m for m in reachable(graph, module) if m.rpartition(".")[0] in above or m in above
            }
            assert not reached, f"{module} imports {sorted(reached)}"


def test_the_wheel_lists_every_subpackage() -> None:
    """`pip install .` (and the Docker image) installs the packages pyproject.toml names:
    one left out installs a CLI that fails on import."""
    pyproject = tomllib.loads((PACKAGE.parent.parent / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    present = {module_name(init, PACKAGE) for init in PACKAGE.rglob("__init__.py")}
    assert present - listed == set()
    assert listed - present == {"cdc_invalidator.sql"}  # (sql/ at the top, package-dir)


def test_the_module_map_names_every_module() -> None:
    """ARCHITECTURE.md's module map names each module: by its path, or by its file name
    in its folder's row (`demo/`, `modes/`). Seven modules had gone unnamed."""
    text = (PACKAGE.parent.parent / "ARCHITECTURE.md").read_text("utf-8")
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| `")}
    unnamed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in {"__init__.py", "__main__.py"}:
            continue
        relative = path.relative_to(PACKAGE).as_posix()
        folder_row = next((r for r in rows if r == f"`{path.parent.name}/`"), None)
        in_folder_row = folder_row is not None and any(
            line.startswith(f"| {folder_row} |") and f"`{path.name}`" in line
            for line in text.splitlines()
        )
        if f"`{relative}`" not in text and not in_folder_row:
            unnamed.append(relative)
    assert unnamed == []


def test_no_test_module_imports_another() -> None:
    """What two test modules share lives in tests/support/: a test module imported by
    another runs its fixtures and parametrizations twice over, and a rename in one
    breaks the other (test_cluster_moves imported test_cluster, test_packs
    test_pgoutput, until both moved what they shared)."""
    tests = Path(__file__).resolve().parent
    found = {
        f"{path.name} imports {node.module}"
        for path in sorted(tests.glob("test_*.py"))
        for node in ast.walk(ast.parse(path.read_text("utf-8")))
        if isinstance(node, ast.ImportFrom)
        and node.module is not None
        and node.module.startswith("tests.test_")
    }
    assert not found, sorted(found)
