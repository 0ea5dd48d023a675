"""analysis/notebooks/frontier.ipynb runs headless (nbclient) against tiny real runs, so that it cannot rot.

The kernel is this interpreter (the venv's python with ipykernel), declared in a kernelspec written to a temporary
JUPYTER_PATH: no global Jupyter installation is needed or used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (pip install nbformat)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (pip install nbclient)")
pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel in this interpreter (pip install ipykernel)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fdpg"))  # fdpg_testing: tiny trainers

from fdpg_testing import build_trainer  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[2] / "analysis" / "notebooks" / "frontier.ipynb"
KERNEL = "fdpg-test-python"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> Path:
    """Two f-DPG runs with different divergences (2 steps, no final evaluation), and a directory that is not a run."""
    root = tmp_path_factory.mktemp("runs")
    for divergence in ("rkl", "fkl"):
        trainer = build_trainer(tiny_model_dir, root / divergence, divergence=divergence, steps=2, eval_samples=0)
        assert trainer.train()["status"] == "finished"
    (root / "not-a-run").mkdir()
    return root


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec that starts this interpreter's ipykernel, found through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fdpg tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return KERNEL


def outputs(cell) -> tuple[str, list[str]]:
    """(the text a cell printed or returned, the MIME types of everything it displayed)."""
    text, kinds = [], []
    for output in cell.get("outputs", []):
        text.append(output.get("text", ""))
        data = output.get("data", {})
        kinds += list(data)
        text.append(data.get("text/html", "") or data.get("text/plain", ""))
    return "".join(text), kinds


@pytest.mark.slow
def test_the_notebook_runs_against_a_runs_directory(runs, kernel, monkeypatch) -> None:
    monkeypatch.setenv("FDPG_RUNS", str(runs))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name=kernel, timeout=180,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    code = [c for c in notebook.cells if c.cell_type == "code"]
    printed = "".join(outputs(c)[0] for c in code)
    assert "skipped" in printed and "not-a-run" in printed  # what it could not load, and why
    assert "2 runs of 1 task(s)" in printed
    frontier, curves, table = (outputs(c) for c in code[-3:])
    assert frontier[1].count("image/png") == 1                # one task: one frontier
    assert curves[1].count("image/png") == 2                  # score and divergences; entropy and Distinct-n
    assert "text/html" in table[1]
    assert "f-DPG rkl" in table[0] and "f-DPG fkl" in table[0]  # the per-divergence table, one row each


def test_the_notebook_is_clean() -> None:
    """Committed without outputs, so that the file's diff is its code, and with the variable at the top."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert 'os.environ.get("FDPG_RUNS"' in code[0].source
