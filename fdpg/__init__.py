"""fdpg: f-divergence preference alignment engine.

``fdpg.train(...)`` is ``fdpg train`` from Python (:mod:`fdpg.api`); ``fdpg.load_plugins(...)`` imports your own
divergences, tasks, utilities and segmenters the way every fdpg command does (:mod:`fdpg.plugins`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def train(config: Any = None, /, **settings: Any) -> Path:
    """Train as ``fdpg train`` does and return the run directory (see :func:`fdpg.api.train`)."""
    from fdpg.api import train as _train

    return _train(config, **settings)


def load_plugins(specs: Any = None) -> list[str]:
    """Import plugins (module names or .py files) as ``--plugins`` does (see :func:`fdpg.plugins.load_plugins`)."""
    from fdpg.plugins import load_plugins as _load

    return _load(specs)


__all__ = ["__version__", "load_plugins", "train"]
