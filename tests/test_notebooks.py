"""Every chapter executes top to bottom, headless, as a learner would run it, in about its cells' own time."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashlab import lab

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# A headless run costs its cells' own time plus the kernel's start and the messages between cells.
# A run that waits on a message that never comes takes a whole timeout (300 s) longer: this catches it.
OVERHEAD_FACTOR, OVERHEAD_S = 3.0, 45.0


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    nb, cells, wall = lab.run_notebook(path)  # raises CellExecutionError, naming the cell, if a cell raises
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    own = sum(cells)
    assert wall <= OVERHEAD_FACTOR * own + OVERHEAD_S, (
        f"{path.name}: the run took {wall:.0f} s for {own:.1f} s of cells: the runner waited on the kernel"
    )
