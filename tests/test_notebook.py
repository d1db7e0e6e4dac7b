"""notebooks/compare.ipynb runs top to bottom on a real (tiny) sweep, so it cannot rot unnoticed."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO


@pytest.mark.slow
def test_the_compare_notebook_shows_the_table_and_plots_of_a_sweep(tiny_sweep, monkeypatch):
    monkeypatch.setenv("LMLAB_SWEEP_DIR", str(tiny_sweep))  # the kernel inherits it
    notebook = nbformat.read(REPO / "notebooks" / "compare.ipynb", as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") + output.get("data", {}).get("text/markdown", "") for output in outputs)
    assert f"{tiny_sweep}: 4 runs, 4 completed" in text
    assert "| model=gpt,tokenizer=bpe | gpt | bpe |" in text
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2  # learning curves and bars
    assert not [output for output in outputs if output.output_type == "error"]
