"""Plots of HBM traffic and of the roofline, drawn into a given matplotlib ``Axes``.

Every ``draw_*`` function draws into ``ax`` and returns its artists; the matching ``update_*`` changes
their data in place, so an explorer can redraw without building a new figure. Sweeps use the closed
forms of :mod:`flashlab.traffic` (exact, and tested equal to the counted runs); counted points can
be overlaid as markers.
"""

from __future__ import annotations

from typing import NamedTuple

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from flashlab import hardware
from flashlab.traffic import attention_flops, forward_traffic, paper_blocks, standard_kernels, total

STYLE = {
    "standard": dict(color="tab:red", label="standard (Algorithm 0)"),
    "fa1": dict(color="tab:blue", label="FlashAttention (Algorithm 1)"),
    "fa2": dict(color="tab:green", label="FlashAttention-2"),
}
PRECISIONS = {"fp32": "fp32_flops_per_s", "bf16": "bf16_dense_flops_per_s"}


def loglog_slope(x, y) -> float:
    """Least-squares slope of ``log y`` against ``log x``: the exponent ``p`` in ``y ~ x^p``."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def forward_elements(
    algorithm: str,
    n: int,
    d: int,
    *,
    m: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    causal: bool = False,
) -> int:
    """Forward HBM traffic in elements for ``N_q = N_k = n``; blocks not given follow the paper's rule
    for an SRAM of ``m`` elements (:func:`flashlab.traffic.paper_blocks`)."""
    if block_q is None or block_k is None:
        if m is None:
            raise ValueError(
                "give block_q and block_k, or m (SRAM elements) to choose them by the paper's rule"
            )
        paper_q, paper_k = paper_blocks(m, d)
        block_q, block_k = block_q or paper_q, block_k or paper_k
    return forward_traffic(algorithm, n, n, d, block_q=block_q, block_k=block_k, causal=causal).elements


def sweep(param: str, values, algorithms=("standard", "fa1", "fa2"), **fixed) -> dict[str, np.ndarray]:
    """Closed-form traffic (elements) of each algorithm as ``param`` (``"n"``, ``"d"``, ``"m"``,
    ``"block_q"`` or ``"block_k"``) takes ``values``; ``fixed`` gives the others
    (as :func:`forward_elements`)."""
    return {
        alg: np.array([forward_elements(alg, **(fixed | {param: int(v)})) for v in values], dtype=float)
        for alg in algorithms
    }


class TrafficPlot(NamedTuple):
    """What :func:`draw_traffic` drew: one line per algorithm (and counted markers), fitted slopes."""

    lines: dict[str, Line2D]
    points: dict[str, Line2D]
    slopes: dict[str, float]


def draw_traffic(
    ax: Axes,
    x,
    curves: dict[str, np.ndarray],
    *,
    xlabel: str,
    counted: dict[str, tuple] | None = None,
    bytes_per_element: int | None = None,
) -> TrafficPlot:
    """Log-log lines of traffic against ``x`` (one per entry of ``curves``), each labelled with its
    fitted slope; ``counted`` maps an algorithm to ``(x, elements)`` measured by a
    :class:`flashlab.memory.MemoryModel`, drawn as markers on its line. Traffic in elements, or bytes
    with ``bytes_per_element``."""
    unit = 1 if bytes_per_element is None else bytes_per_element
    lines, points = {}, {}
    for alg, y in curves.items():
        style = STYLE.get(alg, dict(label=alg))
        (lines[alg],) = ax.loglog(x, np.asarray(y) * unit, "-", **style)
        if counted and alg in counted:
            cx, cy = counted[alg]
            (points[alg],) = ax.loglog(cx, np.asarray(cy) * unit, "o", color=lines[alg].get_color(), ms=5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("HBM traffic (" + ("elements" if bytes_per_element is None else "bytes") + ")")
    ax.grid(True, which="both", alpha=0.3)
    plot = TrafficPlot(lines, points, {})
    return plot._replace(slopes=update_traffic(plot, x, curves, bytes_per_element=bytes_per_element))


def update_traffic(
    plot: TrafficPlot, x, curves: dict[str, np.ndarray], *, bytes_per_element: int | None = None
) -> dict[str, float]:
    """New data for the lines of ``plot`` (same algorithms); relabels slopes, rescales the axes and
    returns the slopes. Counted markers are left as they are."""
    unit = 1 if bytes_per_element is None else bytes_per_element
    slopes = {}
    for alg, line in plot.lines.items():
        y = np.asarray(curves[alg]) * unit
        line.set_data(x, y)
        slopes[alg] = loglog_slope(x, y)
        line.set_label(f"{STYLE.get(alg, dict(label=alg))['label']}: slope {slopes[alg]:.2f}")
    plot.slopes.clear()
    plot.slopes.update(slopes)
    ax = next(iter(plot.lines.values())).axes
    ax.relim()
    ax.autoscale_view()
    ax.legend(fontsize=8)
    return slopes


def traffic_vs_n(ax: Axes, ns, d: int, *, counted=None, algorithms=("standard", "fa1", "fa2"), **blocks):
    """:func:`draw_traffic` against the sequence length ``N`` (``blocks``: ``m`` or
    ``block_q``/``block_k``, and ``causal``)."""
    curves = sweep("n", ns, algorithms, d=d, **blocks)
    return draw_traffic(ax, ns, curves, xlabel="sequence length N", counted=counted)


def traffic_vs_m(ax: Axes, ms, n: int, d: int, *, counted=None, algorithms=("standard", "fa1"), **kw):
    """:func:`draw_traffic` against the SRAM size ``M`` (elements), blocks by the paper's rule."""
    curves = sweep("m", ms, algorithms, n=n, d=d, **kw)
    return draw_traffic(ax, ms, curves, xlabel="SRAM size M (elements)", counted=counted)


def traffic_vs_block(ax: Axes, blocks, n: int, d: int, *, block_q: int, counted=None, algorithms=("fa1",)):
    """:func:`draw_traffic` against the key/value block size ``B_c`` at a fixed ``B_r = block_q``."""
    curves = sweep("block_k", blocks, algorithms, n=n, d=d, block_q=block_q)
    return draw_traffic(ax, blocks, curves, xlabel="key/value block size B_c", counted=counted)


# --- roofline -----------------------------------------------------------------------------------
class Roof(NamedTuple):
    """A GPU's roof: peak FLOP/s at one precision and HBM bandwidth (bytes/s)."""

    name: str
    peak_flops: float
    bytes_per_s: float

    @property
    def ridge(self) -> float:
        """The arithmetic intensity (FLOP/byte) where memory and compute bounds meet."""
        return self.peak_flops / self.bytes_per_s

    def attainable(self, intensity):
        """``min(peak, bandwidth x intensity)``: the roofline."""
        return np.minimum(self.peak_flops, self.bytes_per_s * np.asarray(intensity, float))


def gpu_roof(gpu: str = "H200", precision: str = "bf16", *, peak_flops: float | None = None) -> Roof:
    """The roof of ``gpu`` from ``data/hardware.json`` (:mod:`flashlab.hardware`): its peak at
    ``precision`` (``"fp32"`` or ``"bf16"`` dense) and its HBM bandwidth (the upper figure where a
    range is given). ``peak_flops`` overrides a peak the data file lacks (it has none for the A100)."""
    spec = hardware.spec(gpu)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    peak = peak_flops if peak_flops is not None else spec.get(PRECISIONS[precision])
    if peak is None:
        raise ValueError(f"data/hardware.json has no {PRECISIONS[precision]} for {gpu}; pass peak_flops=")
    return Roof(f"{gpu} {precision}", float(peak), float(max(spec["hbm_bytes_per_s"])))


def draw_roofline(
    ax: Axes, roof: Roof, points: dict[str, float], *, intensities=(0.1, 1e4)
) -> dict[str, object]:
    """The roofline of ``roof`` (log-log, FLOP/s against FLOP/byte) with its ridge marked and each of
    ``points`` (label -> arithmetic intensity) placed on the roof. Returns the artists by name
    (``"roof"``, ``"ridge"`` and one per point)."""
    x = np.geomspace(*intensities, 200)
    artists: dict[str, object] = {}
    (artists["roof"],) = ax.loglog(x, roof.attainable(x), "k-", lw=2, label=f"{roof.name} roof")
    artists["ridge"] = ax.axvline(roof.ridge, color="grey", ls=":", label=f"ridge {roof.ridge:.0f} FLOP/B")
    for (label, intensity), color in zip(points.items(), _colors(len(points)), strict=True):
        (artists[label],) = ax.loglog([intensity], [roof.attainable(intensity)], "o", ms=8, color=color)
        artists[label].set_label(f"{label}: {intensity:.3g} FLOP/B")
    ax.set_xlabel("arithmetic intensity (FLOP per HBM byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")  # the roof rises to the upper right: the corner below is empty
    return artists


def _colors(n: int) -> list:
    return [matplotlib.colormaps["tab10"](i % 10) for i in range(n)]


def extra_memory_and_flops(ns, extra: dict[str, np.ndarray], flops, d: int):
    """Two panels against ``N``: the extra memory (elements) of each algorithm in ``extra`` and the
    FLOPs they share (``flops``, one array). Returns the figure; legends sit outside the data."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for (label, values), marker in zip(extra.items(), "os^v", strict=False):
        left.loglog(ns, values, marker + "-", label=label)
    left.set(xlabel="sequence length N", ylabel="extra memory (elements)", title="O(N^2) against O(N)")
    right.loglog(ns, flops, "^-", color="k", label="both: 4 N^2 d")
    right.set(xlabel="sequence length N", ylabel="FLOPs", title=f"the same arithmetic (d = {d})")
    for ax in (left, right):
        ax.set_xticks(ns, [f"{n:.0f}" for n in ns])
        ax.minorticks_off()
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


ROOFLINE_PRECISIONS = (("bf16", 2), ("fp32", 4))  # (precision, bytes per element)
STAT_BYTES = {"l": 4, "m": 4, "lse": 4, "Z": 1}  # row statistics in float32, a dropout mask in bytes


def attention_intensities(n: int, d: int, block_q: int, element_bytes: int) -> dict[str, float]:
    """FLOP per HBM byte of the attention forward (``4 N^2 d`` FLOPs, closed-form traffic, no cache):
    standard attention, standard with separate scale/mask/dropout kernels, and FA2 with ``block_q``
    query rows per tile (FA2's traffic re-reads K and V once per query block, so ``block_k`` does not
    matter without a mask)."""
    flops = attention_flops(n, n, d)
    points = {
        "standard (Alg. 0)": forward_traffic("standard", n, n, d),
        "standard + scale, mask, dropout kernels": total(standard_kernels(n, n, d)),
        f"FA2, B_r = {block_q} query rows": forward_traffic("fa2", n, n, d, block_q=block_q, block_k=64),
    }
    return {label: flops / t.nbytes(element_bytes, STAT_BYTES) for label, t in points.items()}


def attention_roofline(axes, n: int = 4096, d: int = 64, block_q: int = 128, gpu: str = "H200") -> dict:
    """One roofline panel per precision of :data:`ROOFLINE_PRECISIONS` in ``axes``, with
    :func:`attention_intensities` placed on it. Returns ``{precision: {label: intensity}}``."""
    out = {}
    for ax, (precision, nbytes) in zip(axes, ROOFLINE_PRECISIONS, strict=True):
        roof = gpu_roof(gpu, precision)
        out[precision] = attention_intensities(n, d, block_q, nbytes)
        draw_roofline(ax, roof, out[precision])
        ax.set_title(
            f"{gpu}, {precision}: {roof.peak_flops / 1e12:.0f} TFLOP/s, {roof.bytes_per_s / 1e12:.1f} TB/s"
        )
    return out
