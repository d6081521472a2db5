"""The step-through: the tile visits of a small example, one step at a time.

View :class:`StepView`, static :func:`step_figure`, slider and play button :func:`step_through`: from the
``trace`` of :func:`flashlab.flash.flash_attention`, which tile is on chip, the running max ``m`` and
sum ``l`` of every row, and the partial output ``O`` against the exact one, for both loop orders.
"""

from __future__ import annotations

from typing import NamedTuple

import ipywidgets as widgets
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from flashlab.attention import naive_attention
from flashlab.flash import flash_attention
from flashlab.inputs import causal_mask, check_block
from flashlab.tiles import check_loop_order, n_blocks
from flashlab.widgets.bridge import BUTTONS, DPI, Explorer


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
