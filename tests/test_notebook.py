"""The tutorial notebook runs from top to bottom with the shipped model (every cell, no errors)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import DATA_ROOT, ORIGINAL_RECIPE, ROOT


def test_notebook_executes(tmp_path, monkeypatch):
    if not ORIGINAL_RECIPE.is_file():
        pytest.skip(f"the notebook's model {ORIGINAL_RECIPE} is absent")
    monkeypatch.setenv("FLOWERS_ROOT", str(DATA_ROOT.resolve()))  # the kernel inherits it
    nb = nbformat.read(ROOT / "notebook.ipynb", as_version=4)
    # Raises CellExecutionError, with the failing cell and its traceback, on the first error.
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert sum(o.get("output_type") == "display_data" for o in outputs) >= 10  # the figures were drawn
    nbformat.write(nb, Path(tmp_path) / "executed.ipynb")
