"""Every notebook in notebooks/ runs top to bottom and shows its plots (issue 9, notebooks/).

Executed with nbclient in this interpreter's kernel, with `D2V_NOTEBOOK_QUICK=1` (a few updates
of pretraining and fine-tuning instead of the full tiny recipes) and work directories under a
temporary folder, so the notebooks cannot rot unnoticed.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  names = {path.stem for path in NOTEBOOKS}
  assert {"quickstart_audio", "quickstart_image", "quickstart_text", "import_checkpoint"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_plots(path, tmp_path, monkeypatch):
  monkeypatch.setenv("D2V_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("D2V_NOTEBOOK_RUNS", str(tmp_path))
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(
    notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  )
  client.execute()  # the kernel inherits this environment
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, f"{path.name} shows no plot"
