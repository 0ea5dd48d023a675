"""Fixtures of the ``objectives`` tests: the enumerable toy model and its exact targets.

The toy itself lives in ``toy_model.py`` beside this file; this directory is put on ``sys.path`` so
that both this conftest and the test modules can ``from toy_model import ...`` (the suite runs
with ``--import-mode=importlib``, where test directories are not importable packages).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from toy_model import ToyProblem, make_problem  # noqa: E402


@pytest.fixture(autouse=True)
def single_thread():
    """Run these tiny-tensor tests on one intra-op thread (restored afterwards).

    With several threads, the thread pool's synchronisation dominates such small operations and the
    loops here run several times slower, far more so on a loaded machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rl_problem() -> ToyProblem:
    """P = a exp(r / beta) with a fixed random reward per sequence."""
    return make_problem("rl")


@pytest.fixture
def binary_problem() -> ToyProblem:
    """P = a b with b = 0 on a third of the sequences."""
    return make_problem("binary")


@pytest.fixture
def expfam_problem() -> ToyProblem:
    """P = a exp(lambda phi), lambda fitted exactly so that E_p[phi] = 0.5."""
    return make_problem("expfam")
