"""Explorers: sliders over block sizes and HBM traffic, and a step-through of the tile schedule.

Each explorer is a *view*, a matplotlib :class:`~matplotlib.figure.Figure` that owns its artists and
whose ``draw(**params)`` redraws their data in place, plus ipywidgets controls:

- :func:`block_size_explorer` (view :class:`BlockSizeView`, static :func:`block_size_figure`):
  N, d, SRAM size M, B_r, B_c, loop order and causal mask -> HBM traffic against N for standard
  attention and FlashAttention (closed forms of :mod:`flashlab.traffic`) with the current N marked,
  whether the tiles fit in SRAM (:func:`flashlab.traffic.sram_elements`, the memory model's peak), and the
  ``T_r x T_c`` tile grid of :func:`flashlab.tiles.tile_grid` (skipped causal tiles shaded).
- :func:`step_through` (view :class:`StepView`, static :func:`step_figure`): the tile visits of a
  small example, from the ``trace`` of :func:`flashlab.flash.flash_attention`, one step at a time:
  which tile is on chip, the running max ``m`` and sum ``l`` of every row, the partial output ``O``
  against the exact one, for both loop orders.

The plain ``*_figure`` functions draw the same figure once (a static figure for HTML export, GitHub,
print). An explorer shows its figure as PNG in an ``ipywidgets.Image`` and redraws it on every change,
so it needs nothing beyond ipywidgets in plain JupyterLab. Displayed, an explorer's output carries both
the widget and the PNG of its first figure: JupyterLab shows the widget, a static renderer the figure
(nbconvert's HTML export prefers widget views to images unless told otherwise: ``make html`` ranks
images first, see ``HTML_COMMAND`` in ``tests/test_browser.py``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import NamedTuple

import ipywidgets as widgets
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from flashlab import hardware, plots
from flashlab.attention import naive_attention
from flashlab.flash import flash_attention
from flashlab.inputs import causal_mask, check_block
from flashlab.tiles import check_loop_order, n_blocks, tile_grid
from flashlab.traffic import fitting_blocks, paper_blocks, paper_sram_elements, sram_elements

DTYPE_BYTES = 4  # float32: what the NumPy algorithms compute in and the memory model counts
DPI = 80
N_CHOICES = tuple(2**p for p in range(7, 15))  # 128 .. 16384
D_CHOICES = (16, 32, 64, 128, 256)
ALGORITHMS = ("standard", "fa1", "fa2")
SWEEP_N = np.unique(np.geomspace(64, 65536, 41).astype(int))
BUTTONS = {"button_width": "60px"}  # the loop-order toggle, on one line
MAX_GRID_PIXELS = 512  # larger tile grids are drawn with every k-th tile (the counts stay exact)


# --- the bridge: a figure as PNG bytes, an explorer as widget + static figure ---------------------
def png_bytes(fig: Figure) -> bytes:
    """The figure rendered to PNG (Agg, the figure's own dpi)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})
    return buf.getvalue()


class Explorer:
    """Controls and a view's figure shown as an ``ipywidgets.Image``; a control change redraws it.

    ``controls`` maps each parameter of ``view.draw`` to the widget holding its value; ``rows`` lays
    the widgets out; ``follow(name, params)`` may return new values for other controls after control
    ``name`` changed (set before the one redraw). ``css_class`` marks the outer box (the browser test
    finds the explorer by it). Under the figure, a text line repeats ``view.caption`` (what the figure
    shows, in words: readable without the picture, and set after the picture, so it also says that a
    redraw has arrived).
    """

    def __init__(
        self,
        view,
        controls: dict[str, widgets.ValueWidget],
        rows: list[widgets.Widget],
        *,
        css_class: str,
        label: str,
        follow: Callable[[str, dict], dict] | None = None,
    ):
        self.view, self.controls, self.label, self.follow = view, controls, label, follow
        view.draw(**self.params())
        width = int(view.fig.get_figwidth() * view.fig.dpi)
        self.image = widgets.Image(value=png_bytes(view.fig), format="png", layout={"width": f"{width}px"})
        self.status = widgets.Label(value=view.caption)
        self.status.add_class("flashlab-status")
        self.widget = widgets.VBox([*rows, self.image, self.status])
        self.widget.add_class(css_class)
        self._quiet = False
        for name, control in controls.items():
            control.observe(lambda change, name=name: self._changed(name), names="value")

    def params(self) -> dict:
        """The current value of every control, by parameter name."""
        return {name: control.value for name, control in self.controls.items()}

    def _changed(self, name: str) -> None:
        if self._quiet:
            return
        if self.follow is not None:
            self._quiet = True
            try:
                for other, value in self.follow(name, self.params()).items():
                    self.controls[other].value = value
            finally:
                self._quiet = False
        self.redraw()

    def redraw(self) -> None:
        """Redraw the view's data for the current control values and refresh the image."""
        self.view.draw(**self.params())
        self.image.value = png_bytes(self.view.fig)
        self.status.value = self.view.caption

    def _repr_mimebundle_(self, **kwargs) -> dict:
        data = self.widget._repr_mimebundle_(**kwargs)
        data["image/png"] = base64.b64encode(self.image.value).decode("ascii")
        data["text/plain"] = f"{self.label} (interactive in JupyterLab; this is its static figure)"
        return data


# --- block-size explorer ----------------------------------------------------------------------
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


# --- step-through of the tile schedule --------------------------------------------------------
class Example(NamedTuple):
    """A small attention problem and its exact reference values, row by row."""

    q: np.ndarray  # (N_q, d) float64
    k: np.ndarray  # (N_k, d)
    v: np.ndarray  # (N_k, d)
    block_q: int
    block_k: int


def example(n_q=12, n_k=12, d=4, block_q=4, block_k=3, seed=0) -> Example:
    """Random inputs whose row maxima change along the keys (logits up to ~10), so rescaling shows."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n_q, d)) * 2.0
    k = rng.normal(size=(n_k, d)) * 2.0
    v = rng.normal(size=(n_k, d))
    return Example(q, k, v, check_block("block_q", block_q), check_block("block_k", block_k))


class Exact(NamedTuple):
    """Exact per-row statistics of the full score matrix: row max m, sum l = sum exp(S - m), output O."""

    m: np.ndarray
    l: np.ndarray  # noqa: E741 (the paper's name)
    o: np.ndarray


def exact_rows(ex: Example, causal: bool) -> Exact:
    """``m``, ``l`` of the full (masked) score matrix and ``O`` from :func:`flashlab.naive_attention`."""
    o, lse = naive_attention(ex.q, ex.k, ex.v, causal=causal, return_lse=True)
    s = (ex.q @ ex.k.T) / np.sqrt(ex.q.shape[1])
    if causal:
        s = np.where(causal_mask(len(ex.q), len(ex.k)), s, -np.inf)
    m = s.max(axis=1)
    seen = np.isfinite(m)  # causal with N_q > N_k: a row may see no key (o = 0, lse = -inf)
    return Exact(m, np.exp(lse - np.where(seen, m, 0.0)), o)


class Steps(NamedTuple):
    """The trace of one run, with the state of every row *after* each step (``(steps, N_q)``...)."""

    trace: list  # of flashlab.flash.TileStep
    m: np.ndarray  # running max per row, nan before a row's first tile
    l: np.ndarray  # noqa: E741 running sum per row, nan before a row's first tile
    o: np.ndarray  # (steps, N_q, d_v) partial output per row (normalised), nan before the first tile
    finished: np.ndarray  # (steps, N_q) bool: the row has been through every tile it computes


def run_steps(ex: Example, loop_order: str, causal: bool) -> Steps:
    """Run :func:`flashlab.flash.flash_attention` with a trace and accumulate every row's state."""
    trace = []
    flash_attention(
        ex.q,
        ex.k,
        ex.v,
        block_q=ex.block_q,
        block_k=ex.block_k,
        causal=causal,
        loop_order=loop_order,
        trace=trace,
    )
    n_q, d_v = ex.q.shape[0], ex.v.shape[1]
    m, l, o = np.full(n_q, np.nan), np.full(n_q, np.nan), np.full((n_q, d_v), np.nan)  # noqa: E741
    ms, ls, os_ = [], [], []
    for step in trace:
        if not step.skipped:
            r0, r1 = step.rows
            m[r0:r1], l[r0:r1], o[r0:r1] = step.m, step.l, step.o
        ms.append(m.copy())
        ls.append(l.copy())
        os_.append(o.copy())
    last_visit = np.full(n_q, -1)
    for step in trace:
        if not step.skipped:
            last_visit[slice(*step.rows)] = step.step
    finished = np.arange(len(trace))[:, None] >= last_visit[None, :]
    return Steps(trace, np.array(ms), np.array(ls), np.array(os_), finished)


STEP_CMAP = ListedColormap(["white", "#c6dbef", "#fd8d3c", "#d9d9d9", "#f0f0f0"])
NOT_YET, DONE, CURRENT, SKIPPED, MASKED = range(5)


class StepView:
    """The step-through's figure: the score matrix with the tile on chip, partial vs exact O, m, l."""

    def __init__(self, ex: Example | None = None):
        self.ex = example() if ex is None else ex
        self._runs: dict[tuple[str, bool], Steps] = {}
        self._exact = {c: exact_rows(self.ex, c) for c in (False, True)}
        n_q, n_k = len(self.ex.q), len(self.ex.k)
        rows = np.arange(n_q)
        self.fig = Figure(figsize=(12, 6.8), dpi=DPI)
        axes = self.fig.subplots(
            2, 2, gridspec_kw=dict(left=0.06, right=0.98, top=0.83, bottom=0.08, hspace=0.5)
        )
        self.ax_tiles, self.ax_o, self.ax_m, self.ax_l = axes.ravel()
        a = self.ax_tiles
        self.tile_image = a.imshow(
            np.zeros((n_q, n_k)),
            cmap=STEP_CMAP,
            vmin=0,
            vmax=4,
            interpolation="nearest",
            extent=(-0.5, n_k - 0.5, n_q - 0.5, -0.5),
        )
        for x in np.arange(0, n_k + 1, self.ex.block_k)[1:-1]:
            a.axvline(x - 0.5, color="k", lw=1)
        for y in np.arange(0, n_q + 1, self.ex.block_q)[1:-1]:
            a.axhline(y - 0.5, color="k", lw=1)
        self.current = a.add_patch(Rectangle((0, 0), 1, 1, fill=False, ec="#d94801", lw=3))
        a.set(xlabel="key j (columns of S)", ylabel="query i (rows of S)")
        a.set_title("orange: tile on chip; blue: done; grey: skipped / masked", fontsize=10)
        self.bands = []
        for ax, title in (
            (self.ax_o, ""),
            (self.ax_m, "running max m per row (dots) vs exact row max (dashes)"),
            (self.ax_l, "running sum l per row vs exact l = sum exp(S - m)"),
        ):
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("query row")
            ax.set_xlim(-0.5, n_q - 0.5)
            band = Rectangle(
                (0, 0), 1, 1, transform=ax.get_xaxis_transform(), fc="#fd8d3c", alpha=0.18, ec="none"
            )
            self.bands.append(ax.add_patch(band))
        self.exact_o = self.ax_o.plot(rows, np.zeros(n_q), "o", mfc="none", mec="k", ms=10)[0]
        self.part_o = self.ax_o.plot(rows, np.zeros(n_q), "o", color="tab:green", ms=6)[0]
        self.exact_m = self.ax_m.plot(rows, np.zeros(n_q), "_", color="k", ms=18, mew=2)[0]
        self.part_m = self.ax_m.plot(rows, np.zeros(n_q), "o", color="tab:purple", ms=6)[0]
        self.exact_l = self.ax_l.plot(rows, np.zeros(n_q), "_", color="k", ms=18, mew=2)[0]
        self.part_l = self.ax_l.plot(rows, np.zeros(n_q), "o", color="tab:brown", ms=6)[0]
        self._set_limits()
        self.title = self.fig.suptitle("", fontsize=11, y=0.985)
        self.caption = ""  # the title, on one line (set by draw)

    def _set_limits(self) -> None:
        """Fixed y-limits over every step of both loop orders and masks, so nothing jumps while stepping."""
        runs = [self.steps(lo, c) for lo in ("fa1", "fa2") for c in (False, True)]
        exact = self._exact.values()
        for ax, values in (
            (self.ax_o, [r.o[..., 0] for r in runs] + [e.o[:, 0] for e in exact]),
            (self.ax_m, [r.m for r in runs] + [e.m for e in exact]),
            (self.ax_l, [r.l for r in runs] + [e.l for e in exact] + [np.zeros(1)]),
        ):
            finite = np.concatenate([np.ravel(x) for x in values])
            finite = finite[np.isfinite(finite)]
            lo, hi = finite.min(), finite.max()
            pad = 0.08 * (hi - lo or 1.0)
            ax.set_ylim(lo - pad, hi + pad)

    def steps(self, loop_order: str, causal: bool) -> Steps:
        """The (cached) trace and per-row states of ``loop_order`` with or without the causal mask."""
        key = (check_loop_order(loop_order), bool(causal))
        if key not in self._runs:
            self._runs[key] = run_steps(self.ex, *key)
        return self._runs[key]

    @property
    def n_steps(self) -> int:
        """Tile visits of the schedule (skipped tiles included): ``T_r x T_c``, the same for both orders."""
        return n_blocks(len(self.ex.q), self.ex.block_q) * n_blocks(len(self.ex.k), self.ex.block_k)

    def draw(self, visit=1, loop_order="fa2", causal=False) -> None:
        """Show the state after tile visit number ``visit`` (1 = the first) of ``loop_order``."""
        run = self.steps(loop_order, causal)
        if isinstance(visit, bool) or int(visit) != visit or not 1 <= visit <= len(run.trace):
            raise ValueError(f"visit must be an integer in [1, {len(run.trace)}], got {visit!r}")
        k = int(visit) - 1
        tile, exact = run.trace[k], self._exact[bool(causal)]
        self.tile_image.set_data(self._tile_codes(run, k, causal))
        (r0, r1), (c0, c1) = tile.rows, tile.cols
        self.current.set_bounds(c0 - 0.5, r0 - 0.5, c1 - c0, r1 - r0)
        for band in self.bands:
            band.set_x(r0 - 0.5)
            band.set_width(r1 - r0)
        self.exact_o.set_ydata(exact.o[:, 0])
        self.part_o.set_ydata(run.o[k][:, 0])
        self.exact_m.set_ydata(exact.m)
        self.part_m.set_ydata(run.m[k])
        self.exact_l.set_ydata(exact.l)
        self.part_l.set_ydata(run.l[k])
        finished = run.finished[k]
        err = np.abs(run.o[k][finished] - exact.o[finished])
        self.ax_o.set_title(
            f"partial O (column 0, dots) vs exact O (rings): {finished.sum()} of {len(finished)} rows done"
            + (f",\nmax |O - O_exact| on them {err.max():.1e}" if finished.any() else "\n"),
            fontsize=10,
        )
        self.title.set_text(_describe_step(tile, len(run.trace)))
        self.caption = self.title.get_text().replace("\n", "; ")

    def _tile_codes(self, run: Steps, step: int, causal: bool) -> np.ndarray:
        n_q, n_k = len(self.ex.q), len(self.ex.k)
        codes = np.full((n_q, n_k), NOT_YET, dtype=np.uint8)
        for past in run.trace[: step + 1]:
            (r0, r1), (c0, c1) = past.rows, past.cols
            codes[r0:r1, c0:c1] = SKIPPED if past.skipped else DONE
        (r0, r1), (c0, c1) = run.trace[step].rows, run.trace[step].cols
        codes[r0:r1, c0:c1] = SKIPPED if run.trace[step].skipped else CURRENT
        if causal:
            codes[~causal_mask(n_q, n_k) & (codes != NOT_YET) & (codes != SKIPPED)] = MASKED
        return codes


def _describe_step(visit, n_steps: int) -> str:
    """Two title lines: which tile, and what is on chip (or why nothing is)."""
    i, j, (r0, r1), (c0, c1) = visit.i, visit.j, visit.rows, visit.cols
    head = (
        f"{visit.loop_order}, tile visit {visit.step + 1} of {n_steps}: tile (i={i}, j={j}), "
        f"query rows {r0}-{r1 - 1}, keys {c0}-{c1 - 1}"
    )
    if visit.skipped:
        return f"{head}\nskipped: every entry is masked (causal), nothing is loaded or computed"
    if visit.loop_order == "fa1":
        return (
            f"{head}\non chip: K_{j}, V_{j} (kept for the whole inner loop), Q_{i}, O_{i}, l_{i}, m_{i} "
            "(read from HBM, rescaled, written back)"
        )
    return f"{head}\non chip: Q_{i}, O_{i}, l_{i}, m_{i} (kept over the inner loop), K_{j}, V_{j} (read)"


def step_figure(visit=1, loop_order="fa2", causal=False, ex: Example | None = None) -> Figure:
    """The step-through's figure after tile visit number ``visit`` (1 = the first), drawn once."""
    view = StepView(ex)
    view.draw(visit, loop_order, causal)
    return view.fig


def step_through(ex: Example | None = None, *, loop_order="fa2", causal=False, interval_ms=700) -> Explorer:
    """A tile-visit slider with a Play button, the loop order and the causal mask over :class:`StepView`."""
    view = StepView(ex)
    visit = widgets.IntSlider(
        value=1, min=1, max=view.n_steps, description="tile visit", layout={"width": "480px"}
    )
    play = widgets.Play(value=1, min=1, max=view.n_steps, interval=interval_ms, description="play")
    widgets.jslink((play, "value"), (visit, "value"))
    controls = {
        "visit": visit,
        "loop_order": widgets.ToggleButtons(
            options=["fa1", "fa2"],
            value=check_loop_order(loop_order),
            description="loop order",
            style=BUTTONS,
        ),
        "causal": widgets.Checkbox(value=bool(causal), description="causal mask"),
    }
    rows = [widgets.HBox([play, visit]), widgets.HBox([controls["loop_order"], controls["causal"]])]
    return Explorer(
        view, controls, rows, css_class="flashlab-step-through", label="Step-through of the tile schedule"
    )
