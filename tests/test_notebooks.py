"""The analysis notebooks: committed without outputs, and run top to bottom (nbclient) on `mmret demo --quick`.

.venv/bin/pytest tests/test_notebooks.py -q

The kernel is this interpreter (a kernel spec written to a temporary JUPYTER_PATH), so the notebooks run in the
same environment as the tests in a fresh clone, whatever kernels the machine has registered.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.demo_fixture import quick_demo  # noqa: F401  (fixture)

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "mmret-tests"


def test_both_notebooks_exist():
    assert {path.stem for path in NOTEBOOKS} >= {"explore_retrieval", "loss_geometry"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
        assert not cell.metadata, f"{path.name} cell {index} has metadata {dict(cell.metadata)}"
    assert set(notebook.metadata) <= {"kernelspec", "language_info"}, "notebook metadata beyond the kernel"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory, monkeypatch_module):
    """A kernel spec that starts this very interpreter, found through a temporary JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "mmret tests", "language": "python"})
    )
    monkeypatch_module.setenv("JUPYTER_PATH", str(root))
    return KERNEL_NAME


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom_on_the_quick_demo(path, quick_demo, kernel_name, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MMRET_DEMO_DIR", str(quick_demo.output))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: one thread is faster on two shared cores
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name=kernel_name, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) >= 2, f"{path.name} showed {len(figures)} figure(s)"
    # The file on disk is untouched (executed in memory): it stays stripped.
    assert all(not cell.get("outputs") for cell in nbformat.read(path, as_version=4).cells)
