"""The block-size explorer: N, d, SRAM size M, B_r, B_c, loop order and causal mask -> HBM traffic.

View :class:`BlockSizeView`, static :func:`block_size_figure`, sliders :func:`block_size_explorer`:
traffic against N for standard attention and FlashAttention (closed forms of :mod:`flashlab.traffic`)
with the current N marked, whether the tiles fit in SRAM (:func:`flashlab.traffic.sram_elements`, the
memory model's peak; blocks that do not fit are greyed and never headlined), and the ``T_r x T_c``
tile grid of :func:`flashlab.tiles.tile_grid` (skipped causal tiles shaded).
"""

from __future__ import annotations

from typing import NamedTuple

import ipywidgets as widgets
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from flashlab import hardware, plots
from flashlab.inputs import check_block
from flashlab.tiles import check_loop_order, tile_grid
from flashlab.traffic import fitting_blocks, paper_blocks, paper_sram_elements, sram_elements
from flashlab.widgets.bridge import BUTTONS, DPI, Explorer

DTYPE_BYTES = 4  # float32: what the NumPy algorithms compute in and the memory model counts
N_CHOICES = tuple(2**p for p in range(7, 15))  # 128 .. 16384
D_CHOICES = (16, 32, 64, 128, 256)
ALGORITHMS = ("standard", "fa1", "fa2")
SWEEP_N = np.unique(np.geomspace(64, 65536, 41).astype(int))
MAX_GRID_PIXELS = 512  # larger tile grids are drawn with every k-th tile (the counts stay exact)


class SramUse(NamedTuple):
    """Bytes on chip for one tile step against an SRAM of ``capacity_bytes``."""

    used_bytes: int  # everything the algorithm holds at its peak, counted by the memory model
    tiles_bytes: int  # Q_i, O_i, K_j, V_j: what the paper's block rule budgets
    capacity_bytes: int

    @property
    def fits(self) -> bool:
        return self.used_bytes <= self.capacity_bytes


def sram_blocks(sram_kib: int, d: int) -> tuple[int, int]:
    """The paper's ``(B_r, B_c)`` for an SRAM of ``sram_kib`` KiB holding float32 elements."""
    return paper_blocks(check_block("sram_kib", sram_kib) * 1024 // DTYPE_BYTES, d)


def sram_use(n: int, d: int, sram_kib: int, block_q: int, block_k: int) -> SramUse:
    """What one tile step holds on chip (either loop order), against an SRAM of ``sram_kib`` KiB.

    :func:`flashlab.traffic.sram_elements`: K_j, V_j, Q_i, O_i, the row statistics and the score tile,
    blocks longer than N counted as N; this is the peak that :class:`flashlab.memory.MemoryModel`
    counts in a run (``tests/test_widgets.py`` holds the two together).
    """
    n, d = check_block("n", n), check_block("d", d)
    used = sram_elements(block_q, block_k, d, n_q=n, n_k=n) * DTYPE_BYTES
    tiles = paper_sram_elements(min(n, block_q), min(n, block_k), d) * DTYPE_BYTES
    return SramUse(used, tiles, check_block("sram_kib", sram_kib) * 1024)


def _fmt_bytes(b: float, _pos=None) -> str:
    """``b`` bytes as ``"273 MB"`` (also a tick formatter)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def _compare(standard: float, flash: float) -> str:
    """How many times fewer (or more) bytes FlashAttention moves than standard attention."""
    if flash <= standard:
        return f"FlashAttention moves {standard / flash:.1f}x fewer bytes"
    return f"FlashAttention moves {flash / standard:.1f}x MORE bytes (blocks too small for this N)"


def _headline(n, d, sram_kib, block_q, block_k, loop_order, causal, use: SramUse, at_n: dict) -> str:
    """The traffic comparison at ``N``, only for blocks that fit in SRAM; otherwise the comparison at the
    largest fitting blocks of the paper's shape, said so (a configuration that does not fit is no result)."""
    head = f"at N = {n}: standard {_fmt_bytes(at_n['standard'])}, "
    if use.fits:
        return (
            head
            + f"{loop_order} {_fmt_bytes(at_n[loop_order])}\n"
            + _compare(at_n["standard"], at_n[loop_order])
        )
    fit_q, fit_k = fitting_blocks(sram_kib * 1024 // DTYPE_BYTES, d)
    flash = DTYPE_BYTES * plots.forward_elements(
        loop_order, n, d, block_q=fit_q, block_k=fit_k, causal=causal
    )
    return (
        f"B_r = {block_q}, B_c = {block_k} do not fit in SRAM ({use.used_bytes / use.capacity_bytes:.0%}): "
        f"no result (greyed out).\n{head}{loop_order} at the largest blocks that fit "
        f"({fit_q}, {fit_k}) {_fmt_bytes(flash)}: " + _compare(at_n["standard"], flash)
    )


GRID_CMAP = ListedColormap(["#9ecae1", "#4292c6", "#d9d9d9"])  # computed (checkered), skipped


class BlockSizeView:
    """The block-size explorer's figure: traffic against N (left), the tile grid (right), SRAM verdict."""

    def __init__(self):
        self.fig = Figure(figsize=(12, 5), dpi=DPI)
        grid = self.fig.add_gridspec(
            1, 2, width_ratios=(1.8, 1), left=0.085, right=0.98, top=0.8, bottom=0.22
        )
        ax, self.ax_grid = self.fig.add_subplot(grid[0]), self.fig.add_subplot(grid[1])
        self.ax = ax
        self.traffic: plots.TrafficPlot | None = None  # drawn by the first draw(), then updated
        self.marks = {
            alg: ax.plot([], [], "o", ms=9, mfc="white", mew=2, color=plots.STYLE[alg]["color"])[0]
            for alg in ALGORITHMS
        }
        self.point_text = ax.text(
            0.98, 0.04, "", transform=ax.transAxes, ha="right", va="bottom", fontsize=10
        )
        self.grid_image = self.ax_grid.imshow(
            np.zeros((1, 1)), cmap=GRID_CMAP, vmin=0, vmax=2, interpolation="nearest", aspect="auto"
        )
        self.ax_grid.set(
            xlabel="keys (columns of S), blocks of B_c", ylabel="queries (rows of S), blocks of B_r"
        )
        self.sram_text = self.fig.text(0.01, 0.02, "", fontsize=11, ha="left", va="bottom")
        colors = GRID_CMAP.colors
        swatches = [Rectangle((0, 0), 1, 1, color=c) for c in colors]
        self.fig.legend(  # above the grid, clear of every tile
            swatches,
            ["computed tile", "computed tile (next one: two blues tell tiles apart)", "skipped (causal)"],
            loc="upper right",
            bbox_to_anchor=(0.98, 0.935),
            ncol=3,
            fontsize=8,
            frameon=False,
        )
        self.title = self.fig.suptitle("", fontsize=12, y=0.98)
        self.caption = ""  # the verdict and the point, in words (set by draw)

    def draw(self, n, d, sram_kib, block_q, block_k, loop_order="fa1", causal=False) -> None:
        """Redraw for these parameters (validated as in :mod:`flashlab.traffic` and :mod:`flashlab.tiles`)."""
        n, d = check_block("n", n), check_block("d", d)
        block_q, block_k = check_block("block_q", block_q), check_block("block_k", block_k)
        loop_order, causal = check_loop_order(loop_order), bool(causal)
        curves = plots.sweep("n", SWEEP_N, ALGORITHMS, d=d, block_q=block_q, block_k=block_k, causal=causal)
        self._draw_traffic(curves)
        use = sram_use(n, d, sram_kib, block_q, block_k)
        for alg, line in self.traffic.lines.items():  # blocks that do not fit: FlashAttention greyed out
            line.set_linewidth(3 if alg in ("standard", loop_order) else 1)
            line.set_alpha(1.0 if alg == "standard" or (alg == loop_order and use.fits) else 0.3)
            line.set_color(plots.STYLE[alg]["color"] if alg == "standard" or use.fits else "grey")
        at_n = {
            alg: DTYPE_BYTES
            * plots.forward_elements(alg, n, d, block_q=block_q, block_k=block_k, causal=causal)
            for alg in ("standard", loop_order)
        }
        for alg, mark in self.marks.items():
            mark.set_data([n] if alg in at_n else [], [at_n[alg]] if alg in at_n else [])
            mark.set_color(plots.STYLE[alg]["color"] if alg == "standard" or use.fits else "grey")
        self.ax.relim()
        self.ax.autoscale_view()
        self.point_text.set_text(_headline(n, d, sram_kib, block_q, block_k, loop_order, causal, use, at_n))
        self.point_text.set_color("black" if use.fits else "grey")
        self._draw_grid(n, block_q, block_k, causal, loop_order)
        verdict = (
            f"{'fits in SRAM' if use.fits else 'does NOT fit in SRAM'}: {use.used_bytes:,} B on chip "
            f"of {use.capacity_bytes:,} B ({use.used_bytes / use.capacity_bytes:.0%})"
        )
        self.caption = f"{verdict}; N = {n}, B_r = {block_q}, B_c = {block_k}, {loop_order}"
        if not use.fits:
            fit_q, fit_k = fitting_blocks(sram_kib * 1024 // DTYPE_BYTES, d)
            verdict += f"; the largest blocks of the paper's shape that fit: B_r = {fit_q}, B_c = {fit_k}"
        self.sram_text.set_text(
            f"{verdict}\n"
            f"= Q, O, K, V tiles {use.tiles_bytes:,} B (what the paper's rule budgets)"
            f" + score tile and row statistics {use.used_bytes - use.tiles_bytes:,} B"
        )
        self.sram_text.set_color("darkgreen" if use.fits else "firebrick")
        rule = sram_blocks(sram_kib, d)
        self.title.set_text(
            f"N = {n}, d = {d}, SRAM M = {sram_kib} KiB ({sram_kib * 1024 // DTYPE_BYTES:,} float32), "
            f"B_r = {block_q}, B_c = {block_k} (paper's rule for this M: {rule[0]}, {rule[1]}), "
            f"{loop_order}{', causal' if causal else ''}"
        )

    def _draw_traffic(self, curves: dict[str, np.ndarray]) -> None:
        """Lines of :mod:`flashlab.plots` (closed forms, fitted slopes in the legend), in bytes."""
        if self.traffic is not None:
            plots.update_traffic(self.traffic, SWEEP_N, curves, bytes_per_element=DTYPE_BYTES)
            return
        ax = self.ax
        self.traffic = plots.draw_traffic(
            ax, SWEEP_N, curves, xlabel="sequence length N (= N_q = N_k)", bytes_per_element=DTYPE_BYTES
        )
        ax.set_ylabel("forward HBM traffic (float32, one head)")
        # plain-text ticks: N, and bytes as "1 MB" (mathtext labels take a third of a redraw)
        ax.xaxis.set_major_locator(FixedLocator([4**p for p in range(3, 9)]))  # 64 .. 65536
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:.0f}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(base=10))
        ax.yaxis.set_major_formatter(FuncFormatter(_fmt_bytes))
        ax.yaxis.set_minor_formatter(NullFormatter())

    def _draw_grid(self, n, block_q, block_k, causal, loop_order) -> None:
        computed = tile_grid(n, n, block_q, block_k, causal)
        t_r, t_c = computed.shape
        step_r, step_c = -(-t_r // MAX_GRID_PIXELS), -(-t_c // MAX_GRID_PIXELS)
        shown = computed[::step_r, ::step_c]
        codes = np.where(shown, 0, 2).astype(np.uint8)
        if step_r == step_c == 1:  # checker the computed tiles so that each one can be seen
            checker = (np.arange(t_r)[:, None] + np.arange(t_c)[None, :]) % 2 == 1
            codes[shown & checker] = 1
        self.grid_image.set_data(codes)
        # The image spans whole blocks; the axes clip it at N, so the ragged last blocks are exact.
        self.grid_image.set_extent((0, t_c * block_k, t_r * block_q, 0))
        self.ax_grid.set_xlim(0, n)
        self.ax_grid.set_ylim(n, 0)
        outer = (
            "key blocks j (K_j, V_j read once)" if loop_order == "fa1" else "query blocks i (Q_i read once)"
        )
        n_computed = int(computed.sum())
        self.ax_grid.set_title(
            f"{t_r} x {t_c} tiles (T_r x T_c): {n_computed} computed, {computed.size - n_computed} skipped"
            f" (grey)\n{loop_order}: outer loop over {outer}",
            fontsize=9,
        )


def default_sram_kib() -> int:
    """The A100's shared memory per SM in KiB (:func:`flashlab.hardware.shared_memory_bytes`): 164."""
    return hardware.shared_memory_bytes("A100") // 1024


def block_size_defaults(sram_kib: int | None = None, d: int = 64) -> dict:
    """Default explorer parameters: N = 4096, the A100's shared memory per SM (:func:`default_sram_kib`),
    the paper's block rule for it and its loop order (Algorithm 1)."""
    sram_kib = default_sram_kib() if sram_kib is None else sram_kib
    block_q, block_k = sram_blocks(sram_kib, d)
    return dict(
        n=4096, d=d, sram_kib=sram_kib, block_q=block_q, block_k=block_k, loop_order="fa1", causal=False
    )


def block_size_figure(**params) -> Figure:
    """The block-size explorer's figure, drawn once (missing parameters from :func:`block_size_defaults`)."""
    view = BlockSizeView()
    view.draw(**_with_defaults(params))
    return view.fig


def _with_defaults(params: dict) -> dict:
    defaults = block_size_defaults(params.get("sram_kib"), params.get("d", 64))
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"unknown block-size parameters {sorted(unknown)}; known: {sorted(defaults)}")
    return defaults | params


def _follow_paper_rule(name: str, params: dict) -> dict:
    """After M or d changed, the block sliders jump to the paper's rule for the new M and d."""
    if name not in ("sram_kib", "d"):
        return {}
    block_q, block_k = sram_blocks(params["sram_kib"], params["d"])
    return {"block_q": block_q, "block_k": block_k}


def block_size_explorer(**params) -> Explorer:
    """Sliders for N, d, M (KiB), B_r, B_c, the loop order and the causal mask over :class:`BlockSizeView`.

    Changing M or d resets B_r, B_c to the paper's rule (``B_c = ceil(M / 4d)``, ``B_r = min(B_c, d)``);
    move them afterwards to see what other blocks cost. Display the returned explorer (last line of a
    cell); ``explorer.controls[name].value = x`` changes a parameter from code.
    """
    p = _with_defaults(params)
    style = {"description_width": "90px"}
    wide = {"width": "420px"}
    controls = {
        "n": widgets.SelectionSlider(
            options=N_CHOICES, value=p["n"], description="N", style=style, layout=wide
        ),
        "d": widgets.SelectionSlider(
            options=D_CHOICES, value=p["d"], description="d", style=style, layout=wide
        ),
        "sram_kib": widgets.IntSlider(
            value=p["sram_kib"], min=32, max=256, step=4, description="SRAM M (KiB)", style=style, layout=wide
        ),
        "block_q": widgets.IntSlider(
            value=p["block_q"], min=8, max=256, description="B_r", style=style, layout=wide
        ),
        "block_k": widgets.IntSlider(
            value=p["block_k"], min=8, max=1024, description="B_c", style=style, layout=wide
        ),
        "loop_order": widgets.ToggleButtons(
            options=["fa1", "fa2"], value=p["loop_order"], description="loop order", style=BUTTONS
        ),
        "causal": widgets.Checkbox(value=p["causal"], description="causal mask"),
    }
    c = controls
    rows = [
        widgets.HBox([c["n"], c["d"]]),
        widgets.HBox([c["sram_kib"], c["block_q"]]),
        widgets.HBox([c["block_k"], c["loop_order"], c["causal"]]),
    ]
    return Explorer(
        BlockSizeView(),
        controls,
        rows,
        css_class="flashlab-block-size",
        label="Block-size explorer",
        follow=_follow_paper_rule,
    )
