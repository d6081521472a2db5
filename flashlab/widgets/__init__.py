"""Explorers, one module per concept; every name the notebooks use is importable from here.

- :mod:`flashlab.widgets.bridge`: a figure as PNG bytes; :class:`Explorer`, controls over a view;
- :mod:`flashlab.widgets.block_size`: the block-size explorer (chapter 6's playground);
- :mod:`flashlab.widgets.step_through`: the tile-by-tile step-through (chapter 2).

Each explorer is a *view*, a matplotlib figure that owns its artists and whose ``draw(**params)``
redraws their data in place, plus ipywidgets controls; the plain ``*_figure`` functions draw the same
figure once (for HTML export, GitHub, print).
"""

from flashlab.widgets.block_size import (
    ALGORITHMS,
    D_CHOICES,
    DTYPE_BYTES,
    GRID_CMAP,
    MAX_GRID_PIXELS,
    N_CHOICES,
    SWEEP_N,
    BlockSizeView,
    SramUse,
    block_size_defaults,
    block_size_explorer,
    block_size_figure,
    default_sram_kib,
    sram_blocks,
    sram_use,
)
from flashlab.widgets.bridge import DPI, Explorer, png_bytes
from flashlab.widgets.step_through import (
    CURRENT,
    DONE,
    MASKED,
    NOT_YET,
    SKIPPED,
    STEP_CMAP,
    Exact,
    Example,
    Steps,
    StepView,
    exact_rows,
    example,
    run_steps,
    step_figure,
    step_through,
)

__all__ = [
    "ALGORITHMS",
    "CURRENT",
    "DONE",
    "DPI",
    "DTYPE_BYTES",
    "D_CHOICES",
    "GRID_CMAP",
    "MASKED",
    "MAX_GRID_PIXELS",
    "NOT_YET",
    "N_CHOICES",
    "SKIPPED",
    "STEP_CMAP",
    "SWEEP_N",
    "BlockSizeView",
    "Exact",
    "Example",
    "Explorer",
    "SramUse",
    "StepView",
    "Steps",
    "block_size_defaults",
    "block_size_explorer",
    "block_size_figure",
    "default_sram_kib",
    "exact_rows",
    "example",
    "png_bytes",
    "run_steps",
    "sram_blocks",
    "sram_use",
    "step_figure",
    "step_through",
]
