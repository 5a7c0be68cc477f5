"""The notebooks run top to bottom with the tiny random model and show their figures (issue #5).

Executed with nbclient in a fresh ``python3`` kernel from ``notebooks/`` (their working directory in Jupyter), with
``TRAITLOC_NOTEBOOK_WORK`` pointing their outputs at a temporary folder. Skips cleanly when nbclient, nbformat or
ipykernel are not installed (they come with the ``test`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
#: notebook, minimum number of figures (image/png outputs) it must show, modules it needs
CASES = [
    ("quickstart.ipynb", 3, ()),
    ("audit_walkthrough.ipynb", 2, ("traitloc.pipelines.audit",)),
]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_notebooks_are_committed_without_outputs(name: str) -> None:
    book = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    assert book["nbformat"] == 4
    code = [c for c in book["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: strip the outputs before commit"


@pytest.mark.slow  # a kernel, torch and open_clip imports: 15-40 s on 2 cores
@pytest.mark.parametrize("name, min_figures, needs", CASES)
def test_notebook_runs_and_shows_figures(
    name: str, min_figures: int, needs: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for module in needs:
        pytest.importorskip(module)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRAITLOC_NOTEBOOK_WORK", str(tmp_path))
    monkeypatch.delenv("TRAITLOC_MODEL", raising=False)  # the tiny random model
    monkeypatch.delenv("TRAITLOC_PRETRAINED", raising=False)
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, when a cell fails
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= min_figures, f"{name} showed {len(figures)} figures, expected >= {min_figures}"
    assert any(tmp_path.iterdir()), "the notebook wrote nothing to TRAITLOC_NOTEBOOK_WORK"
