"""The Python entry point of ``fdpg train`` for notebooks and scripts: :func:`train` returns the run directory.

::

    import fdpg

    run = fdpg.train(task="sentiment", divergence="neyman", plugins="./my_div.py", steps=40, lora_r=8,
                     output_dir="runs/neyman")
    fdpg.train(resume=run, steps=80)          # continue it (its own settings, plugins included)

It is the command itself, in this process: the settings go through the same parser as the command line (a
``--config`` file, a resumed run's saved settings and the task's suggested defaults apply the same way), the same
plugins are loaded and recorded, and the same trainer runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fdpg.config import TrainConfig


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def settings_to_argv(settings: Mapping[str, Any]) -> list[str]:
    """``{"beta": 0.1, "plugins": ["a", "b.py"]}`` -> ``["--beta", "0.1", "--plugins", "a,b.py"]``; an unknown
    name is refused with the list of settings (``None`` values are left out: the default stays)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} | {"config"}
    unknown = sorted(set(settings) - names)
    if unknown:
        import difflib

        hints = {u: difflib.get_close_matches(u, names, n=1) for u in unknown}
        text = ", ".join(f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hints.items())
        raise TypeError(f"fdpg.train: unknown setting(s) {text}; the settings are the fields of "
                        "fdpg.config.TrainConfig (`fdpg train --help`)")
    return [arg for name, value in settings.items() if value is not None
            for arg in (f"--{name}", _flag_value(value))]


def train(config: TrainConfig | Mapping[str, Any] | str | Path | None = None, /, **settings: Any) -> Path:
    """Train as ``fdpg train`` does and return the run directory.

    ``config``: a :class:`~fdpg.config.TrainConfig` (its fields that differ from the defaults are used), a mapping
    of settings, or the path of a YAML/JSON settings file; keyword ``settings`` (any ``TrainConfig`` field, e.g.
    ``plugins="./my_div.py"``, ``resume="runs/x"``) override it. Raises ``RuntimeError`` when the run stops before
    its last step (a signal), naming the directory to resume."""
    from fdpg.cli import parse_train_args, run_training

    argv: list[str] = []
    if isinstance(config, (str, Path)):
        argv += ["--config", str(config)]
    elif isinstance(config, TrainConfig):
        default = TrainConfig()
        settings = {**{f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)
                       if getattr(config, f.name) != getattr(default, f.name)}, **settings}
    elif isinstance(config, Mapping):
        settings = {**config, **settings}
    elif config is not None:
        raise TypeError(f"fdpg.train: config must be a TrainConfig, a mapping or a file path, got {type(config)}")
    summary, run_dir = run_training(parse_train_args([*argv, *settings_to_argv(settings)]))
    if run_dir is None:
        raise RuntimeError("fdpg.train: this process is not the main one of a distributed run; it has no run "
                           "directory to return")
    if summary["status"] != "finished":
        raise RuntimeError(f"fdpg.train: the run stopped ({summary['status']}) after {summary['steps_completed']}/"
                           f"{summary['steps']} steps; resume it with fdpg.train(resume={str(run_dir)!r})")
    return Path(run_dir)
