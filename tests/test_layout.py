"""The layers import downward only: ``objectives`` (tensor functions) <- the engine and ``fdpg/algorithms/`` <-
``tasks`` <- the command line (``fdpg/cli.py``, ``fdpg/commands/``) and ``analysis``. Every import is checked, the
ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND_LINE = {ROOT / "fdpg" / "cli.py", ROOT / "fdpg" / "api.py", *(ROOT / "fdpg" / "commands").glob("*.py")}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def upward(names: set[str], above: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == a or n.startswith(a + ".") for a in above))


ENGINE = sorted(p for p in (ROOT / "fdpg").rglob("*.py") if p not in COMMAND_LINE)


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_engine_and_the_algorithms_import_nothing_from_the_layers_above(path: Path) -> None:
    assert not upward(imported_modules(path), ("tasks", "analysis", "experiments", "fdpg.commands", "fdpg.cli"))


@pytest.mark.parametrize("path", sorted((ROOT / "objectives").glob("*.py")), ids=lambda p: p.name)
def test_objectives_import_neither_the_engine_nor_the_tasks(path: Path) -> None:
    assert not upward(imported_modules(path), ("fdpg", "tasks", "analysis", "transformers"))


def test_the_check_sees_an_upward_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tasks import TaskSpec\n    import fdpg.commands.sweep\n")
    assert upward(imported_modules(module), ("tasks", "fdpg.commands")) == ["fdpg.commands.sweep", "tasks"]


PACKAGES = ("fdpg", "objectives", "tasks", "analysis")


def module_name(path: Path, root: Path = ROOT) -> str:
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the first-party modules it imports (inside functions too): ``from a.b import c`` names ``a.b.c``
    when that is a module, else ``a.b``; a module's imports of its own enclosing packages are left out (a package
    re-exporting its modules is no circle)."""
    modules = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(filter(None, (owner(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found = full if full in modules else owner(node.module)
                    if found:
                        targets.add(found)
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_another_that_imports_it_back() -> None:
    assert import_cycles(import_graph()) == []


def test_the_cycle_check_sees_a_circle_through_a_function_level_import(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from pkg.a import f\n")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (tmp_path / "pkg" / "b.py").write_text("from pkg import a\n")
    assert import_cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b"]]
