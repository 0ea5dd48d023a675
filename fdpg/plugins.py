"""A researcher's own code in every fdpg process: modules or files imported before a command parses.

A plugin is a Python module (``my_divergences``, importable from ``sys.path``) or a file (``./my_task.py``) whose
import registers what it defines: :func:`objectives.register_divergence`, :func:`tasks.register_task`,
:func:`objectives.utilities.register_utility`, :func:`objectives.segments.register_segmenter`. Three sources,
all loaded before any command reads its flags:

- ``--plugins my_div,./my_task.py`` on any ``fdpg`` command (comma-separated; repeatable);
- the environment variable ``FDPG_PLUGINS`` (the same form);
- entry points of installed packages in the group ``fdpg.plugins`` (``[project.entry-points."fdpg.plugins"]
  my_pkg = "my_pkg.fdpg_plugin"`` in the package's pyproject.toml).

Files are recorded by absolute path. After loading, ``FDPG_PLUGINS`` holds every plugin named on the command line
or in the environment, so the processes a command starts (sweep cells, pipeline stages, the experiments' steps)
import the same ones; ``fdpg train`` records them in the run's ``config.json`` (``plugins``), from where
``--resume`` and ``fdpg report`` load them again. A plugin that fails to import stops the command at once with
:class:`PluginError` naming the plugin, its file and the error.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path

ENV_VAR = "FDPG_PLUGINS"
ENTRY_POINT_GROUP = "fdpg.plugins"

_loaded: dict[str, str] = {}  # spec as recorded (module name or absolute file path) -> module name
_entry_points_loaded = False


class PluginError(ImportError):
    """A plugin could not be found or raised while it was imported."""


def split_specs(text: str | Iterable[str] | None) -> list[str]:
    """``"a, ./b.py"`` (or a list of such strings) -> ``["a", "./b.py"]``; empty parts dropped."""
    if text is None:
        return []
    parts = [text] if isinstance(text, str) else list(text)
    return [p.strip() for part in parts for p in str(part).split(",") if p.strip()]


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def canonical(spec: str) -> str:
    """How a plugin is recorded: a file by its absolute path, a module by its dotted name."""
    return str(Path(spec).expanduser().resolve()) if _is_file_spec(spec) else spec


def _import_file(path: Path) -> str:
    if not path.is_file():
        raise PluginError(f"plugin file {str(path)!r} does not exist (give a .py file or an importable module "
                          f"name in --plugins / {ENV_VAR})")
    # a unique, stable module name per file, so that two plugins called task.py in different folders coexist
    name = f"fdpg_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return name
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise PluginError(f"plugin file {str(path)!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        raise PluginError(f"plugin {str(path)!r} failed to import: {_describe(exc, path)}") from exc
    return name


def _import_module(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise PluginError(f"plugin {name!r} not found: no module {exc.name!r} on sys.path (give a file path "
                              f"such as ./{name.replace('.', '/')}.py, or install the package)") from exc
        raise PluginError(f"plugin {name!r} failed to import: {_describe(exc, None)}") from exc
    except BaseException as exc:
        raise PluginError(f"plugin {name!r} failed to import: {_describe(exc, None)}") from exc
    return module.__name__


def _describe(exc: BaseException, path: Path | None) -> str:
    """``ErrorType: message (file F, line N)``: the innermost frame of the plugin's own code."""
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if path is None or Path(f.filename).resolve() == path] or frames
    if own:
        where = f" ({own[-1].filename}, line {own[-1].lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def load_plugins(specs: str | Iterable[str] | None = None, *, environment: bool = True,
                 entry_points: bool = True) -> list[str]:
    """Import the plugins named by ``specs`` (and, unless turned off, ``FDPG_PLUGINS`` and the installed
    ``fdpg.plugins`` entry points); each at most once per process. Return the recorded specs of every plugin
    loaded so far from names (not entry points), and put them in ``FDPG_PLUGINS`` for child processes."""
    global _entry_points_loaded
    wanted = split_specs(os.environ.get(ENV_VAR)) if environment else []
    wanted += split_specs(specs)
    for spec in wanted:
        if (not _is_file_spec(spec) and Path(f"{spec}.py").is_file()
                and importlib.util.find_spec(spec.split(".")[0]) is None):
            spec = f"./{spec}.py"  # `--plugins my_div` beside my_div.py: the console script's sys.path lacks "."
        key = canonical(spec)
        if key in _loaded:
            continue
        _loaded[key] = _import_file(Path(key)) if _is_file_spec(spec) else _import_module(key)
    if entry_points and not _entry_points_loaded:
        _entry_points_loaded = True
        for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                point.load()
            except BaseException as exc:
                raise PluginError(f"plugin entry point {point.name!r} ({point.value}, group {ENTRY_POINT_GROUP!r}) "
                                  f"failed to import: {_describe(exc, None)}") from exc
    recorded = loaded_plugins()
    if recorded:
        os.environ[ENV_VAR] = ",".join(recorded)
    return recorded


def loaded_plugins() -> list[str]:
    """The plugins loaded in this process by name or path, in load order (what a run records)."""
    return list(_loaded)


def pop_plugins_flag(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``--plugins X`` / ``--plugins=X`` (any number, anywhere) out of a command line: (specs, the rest)."""
    specs, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--plugins":
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise PluginError("--plugins needs a value: comma-separated module names or .py files")
            specs += split_specs(args[i + 1])
            i += 2
            continue
        if arg.startswith("--plugins="):
            specs += split_specs(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return specs, rest


def load_recorded(paths: Iterable[str | Path]) -> list[str]:
    """Load the plugins recorded by the runs at or under ``paths`` (glob patterns expanded); see
    :func:`recorded_in_runs`."""
    import glob

    expanded = [match for path in paths for match in (glob.glob(str(path)) or [str(path)])]
    return load_plugins(recorded_in_runs(expanded), environment=False, entry_points=False)


def recorded_in_runs(paths: Iterable[str | Path]) -> list[str]:
    """The plugins recorded in the ``config.json`` of the runs at or under ``paths`` (for ``fdpg report``,
    ``fdpg eval --model RUN``, ``fdpg analyze``)."""
    import json

    found: list[str] = []
    for path in paths:
        root = Path(path)
        files = [root / "config.json"] if (root / "config.json").is_file() else (
            sorted(root.rglob("config.json")) if root.is_dir() else [])
        for file in files:
            try:
                config = json.loads(file.read_text()).get("config", {})
            except (OSError, ValueError, AttributeError):
                continue
            for spec in split_specs(config.get("plugins") if isinstance(config, dict) else None):
                if spec not in found:
                    found.append(spec)
    return found
