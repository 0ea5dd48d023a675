"""Fixtures of the engine tests; the helpers themselves live in ``fdpg_testing.py`` beside this file.

This directory is put on ``sys.path`` so that the test modules (and the distributed worker script) can
``from fdpg_testing import ...`` (the suite runs with ``--import-mode=importlib``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fdpg_testing import build_trainer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the tiny models gain nothing from more, and on a busy 2-core machine OpenMP
    spin-waiting makes them up to 100x slower (5 s instead of 50 ms for one generate call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_trainer(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Any]:
    """``make_trainer(target=None, scorer=toy_scorer, prompts=PROMPTS, model_dir=None, **config)``.

    An :class:`~fdpg.trainer.FDPGTrainer` on a freshly loaded tiny Llama (see ``fdpg_testing``);
    ``output_dir`` defaults to ``tmp_path / 'run'``.
    """

    def make(model_dir: Path | None = None, **kwargs: Any):
        kwargs.setdefault("output_dir", tmp_path / "run")
        return build_trainer(model_dir or tiny_model_dir, **kwargs)

    return make
