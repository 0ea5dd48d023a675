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
