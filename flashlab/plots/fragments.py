"""Pictures of the ``mma.m16n8k16`` fragment layouts: which lane holds which element of A, B and C.

Drawn from :func:`flashlab.cuda.ptx.index_table`, the same maps the emulation and the tests use.
Each cell shows ``lane:element``; the colour is the lane's group ``g = lane >> 2`` (the four lanes
of a group share rows of A and C and a column of B).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from flashlab.cuda import ptx

TITLES = {"a": "A (16 x 16, 4 registers)", "b": "B (16 x 8, 2 registers)", "c": "C, D (16 x 8, 4 floats)"}


def draw_fragment(which: str, ax) -> None:
    """Draw operand ``which`` (``"a"``, ``"b"`` or ``"c"``) into ``ax``."""
    rows, cols = ptx.index_table(which)
    shape = ptx.SHAPES[which]
    group = np.zeros(shape)
    cmap = plt.get_cmap("tab10")
    for lane in range(ptx.WARP):
        for i in range(rows.shape[1]):
            r, c = rows[lane, i], cols[lane, i]
            group[r, c] = lane >> 2
            ax.text(c, r, f"{lane}:{i}", ha="center", va="center", fontsize=5)
    ax.imshow(group, cmap=cmap, vmin=0, vmax=9, alpha=0.45)
    ax.set_title(TITLES[which], fontsize=9)
    ax.set_xticks(range(shape[1]))
    ax.set_yticks(range(shape[0]))
    ax.tick_params(labelsize=6)
    ax.set_xlabel("column")
    ax.set_ylabel("row")


def draw_fragments(fig=None):
    """A, B and C side by side; returns the figure."""
    fig = fig or plt.figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [16, 8, 8]})
    for which, ax in zip("abc", axes, strict=True):
        draw_fragment(which, ax)
    fig.suptitle("mma.m16n8k16: cell = lane:element (element i of A and B is in register i // 2)")
    fig.tight_layout()
    return fig
