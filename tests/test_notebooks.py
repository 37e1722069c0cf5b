"""Every notebook executes top to bottom (stored notebooks carry no outputs)."""

import glob
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  nbformat = pytest.importorskip("nbformat", reason="the `notebooks` extra is not installed")
  nbclient = pytest.importorskip("nbclient", reason="the `notebooks` extra is not installed")
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      f"{path} is stored with outputs; clear them"
  nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
