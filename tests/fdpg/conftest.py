"""Fixtures of the engine tests; the helpers themselves live in ``fdpg_testing.py`` beside this file.

This directory is put on ``sys.path`` so that the test modules (and the distributed worker script) can
``from fdpg_testing import ...`` (the suite runs with ``--import-mode=importlib``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fdpg_testing import build_trainer  # noqa: E402


@pytest.fixture
def make_trainer(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Any]:
    """``make_trainer(target=None, scorer=toy_scorer, prompts=PROMPTS, model_dir=None, **config)``.

    An :class:`~fdpg.algorithms.f_dpg.FDPGTrainer` on a freshly loaded tiny Llama (see ``fdpg_testing``);
    ``output_dir`` defaults to ``tmp_path / 'run'``.
    """

    def make(model_dir: Path | None = None, **kwargs: Any):
        kwargs.setdefault("output_dir", tmp_path / "run")
        return build_trainer(model_dir or tiny_model_dir, **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_vllm():
    """One vLLM engine for the tests on the enumerable vLLM model (each policy object is synced in full on first
    use); skipped where vLLM is not installed, unless ``FDPG_REQUIRE_VLLM=1`` (then its absence fails)."""
    import importlib.util
    import os

    if importlib.util.find_spec("vllm") is None and os.environ.get("FDPG_REQUIRE_VLLM") != "1":
        pytest.skip("vLLM is not installed: `make test-vllm` runs these in its environment")
    from fdpg_testing import vllm_test_generator

    return vllm_test_generator()
