"""Every notebook runs top to bottom; their cells assert on their own results."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
CONCLUSIONS = {  # what each notebook prints once its assertions passed
    "quickstart": "every peer holds the exact average",
    "training": "every trainer holds the same parameters",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(CONCLUSIONS[path.stem] in o.get("text", "") for o in outputs)


def test_every_notebook_is_run():
    assert sorted(CONCLUSIONS) == [p.stem for p in NOTEBOOKS]
