"""Drawn diagrams of the course, each from the numbers the code uses (never typed in).

- :func:`memory_hierarchy`: registers, shared memory (SRAM) and HBM of one GPU, sizes and bandwidths
  from ``data/hardware.json`` (:mod:`flashlab.hardware`) and the per-SM limits of
  :data:`flashlab.cuda.primer.SM90`;
- :func:`outer_step`: the paper's Figure 1 as one outer step of Algorithm 1: which tiles sit in SRAM,
  which are read from HBM and written back, with the step's element counts
  (:func:`outer_step_traffic`, which sums over the steps to :func:`flashlab.traffic.fa1_forward`);
- :func:`tile_owners`: the ``register_tiled`` thread -> micro-tile ownership map, as recorded in the
  simulator (:func:`flashlab.cuda.primer.register_tiled_owners`), and the shared-memory reads per
  multiply-add it saves;
- :func:`backward_flow`: the backward kernel's data flow: one thread block per key block reads each
  query block, accumulates ``dK_j, dV_j`` on chip, and adds into ``dQ_i`` with atomics (every key
  block that sees query block ``i`` adds into the same ``dQ_i``).

Each function draws into the given ``Axes`` and returns the numbers it drew, for tests.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import FancyArrowPatch, Rectangle

from flashlab import hardware
from flashlab.tiles import block_range, n_blocks, tile_grid
from flashlab.traffic import Traffic

READ, WRITE, HELD, IDLE = "tab:blue", "tab:orange", "tab:green", "0.85"


def _si(x: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _binary(x: float) -> str:
    for factor, prefix in ((2**30, "Gi"), (2**20, "Mi"), (2**10, "Ki")):
        if x >= factor:
            return f"{x / factor:.3g} {prefix}B"
    return f"{x:.3g} B"


def _box(ax: Axes, x, y, w, h, color, text=None, fontsize=9, **kw) -> Rectangle:
    rect = Rectangle((x, y), w, h, facecolor=color, edgecolor="k", lw=0.8, **kw)
    ax.add_patch(rect)
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)
    return rect


def _arrow(ax: Axes, start, end, color) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=color, lw=1.5))


def _blank(ax: Axes, title: str) -> None:
    ax.set_axis_off()
    ax.set_title(title, fontsize=11)
    ax.autoscale_view()


# --- the memory hierarchy -------------------------------------------------------------------------


def hierarchy_levels(gpu: str = "H200") -> list[dict]:
    """Registers, shared memory and HBM of ``gpu``: name, bytes per SM and in all, bandwidth (bytes/s,
    ``None`` where ``data/hardware.json`` gives none)."""
    from flashlab.cuda.primer import SM90

    spec = hardware.spec(gpu)
    sms = spec["sm_count"]
    registers = 4 * SM90["registers"]
    return [
        {"name": "registers", "per_sm": registers, "total": registers * sms, "bandwidth": None},
        {
            "name": "shared memory (SRAM)",
            "per_sm": hardware.shared_memory_bytes(gpu),
            "total": hardware.shared_memory_bytes(gpu) * sms,
            "bandwidth": spec.get("sram_bytes_per_s"),
        },
        {
            "name": "HBM",
            "per_sm": None,
            "total": max(spec["hbm_capacity_bytes"]),
            "bandwidth": max(spec["hbm_bytes_per_s"]),
        },
    ]


def memory_hierarchy(ax: Axes, gpu: str = "H200") -> list[dict]:
    """A pyramid: each level's width grows with the log of its size; labels give size and bandwidth."""
    levels = hierarchy_levels(gpu)
    sizes = np.log10([lv["total"] for lv in levels])
    widths = 0.65 + 0.35 * (sizes - sizes.min()) / (sizes.max() - sizes.min())
    for row, (lv, w) in enumerate(zip(levels, widths, strict=True)):
        y = len(levels) - 1 - row
        per_sm = f"{_binary(lv['per_sm'])} per SM, " if lv["per_sm"] else ""
        bw = _si(lv["bandwidth"], "B/s") if lv["bandwidth"] else "bandwidth: not in hardware.json"
        text = f"{lv['name']}\n{per_sm}{_si(lv['total'], 'B')} in all\n{bw}"
        _box(ax, 0.5 - w / 2, y, w, 0.9, matplotlib.colormaps["Greens"](0.3 + 0.2 * row), text)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, len(levels))
    ax.text(1.0, 0, f"{hardware.spec(gpu)['sm_count']} SMs", ha="right", va="bottom", fontsize=8)
    _blank(ax, f"{gpu}: faster at the top, HBM holds the most")
    return levels


# --- Figure 1: one outer step of Algorithm 1 ------------------------------------------------------


def outer_step_traffic(
    j: int, n_q: int, n_k: int, d: int, *, block_q: int, block_k: int, causal=False
) -> Traffic:
    """HBM elements moved by outer step ``j`` of Algorithm 1: ``K_j, V_j`` once (line 6), then for each
    query block ``i`` that sees key block ``j``: ``Q_i, O_i, l_i, m_i`` read and ``O_i, l_i, m_i``
    written (lines 8 and 12-13)."""
    keys = np.subtract(*block_range(j, block_k, n_k)[::-1])
    grid = tile_grid(n_q, n_k, block_q, block_k, causal)
    rows = sum(np.subtract(*block_range(i, block_q, n_q)[::-1]) for i in np.flatnonzero(grid[:, j]))
    return Traffic(
        reads={"K": keys * d, "V": keys * d, "Q": rows * d, "O": rows * d, "l": rows, "m": rows},
        writes={"O": rows * d, "l": rows, "m": rows},
    )


def outer_step(
    ax: Axes, n: int = 8, d: int = 4, *, block_q: int = 2, block_k: int = 4, j: int = 1, i: int = 2
) -> Traffic:
    """Figure 1 (right) of the paper for outer step ``j`` at inner step ``i``: HBM on the left (Q, K^T,
    V, O split into blocks), SRAM on the right holding ``K_j, V_j`` for the whole step and ``Q_i, O_i``
    and the score tile ``S_ij`` for one inner step. Returns the step's :func:`outer_step_traffic`."""
    t_r, t_c = n_blocks(n, block_q), n_blocks(n, block_k)
    if not (0 <= j < t_c and 0 <= i < t_r):
        raise ValueError(f"j, i: need 0 <= j < T_c={t_c} and 0 <= i < T_r={t_r}, got j={j}, i={i}")
    u = 1.0 / n  # one row of a matrix

    def blocks(x0, name, count, block, current, color, horizontal=False):
        for b in range(count):
            lo, hi = block_range(b, block, n)
            c = color if b == current else IDLE
            if horizontal:  # K^T: blocks are columns
                _box(ax, x0 + lo * u * 0.5, 1.2, (hi - lo) * u * 0.5, 0.3, c)
            else:
                _box(ax, x0, 1 - hi * u, 0.12, (hi - lo) * u, c)
        ax.text(
            x0 + (0.25 if horizontal else 0.06), 1.55 if horizontal else 1.03, name, ha="center", fontsize=10
        )

    blocks(0.0, "Q", t_r, block_q, i, READ)
    blocks(0.2, "K$^T$", t_c, block_k, j, HELD, horizontal=True)
    blocks(0.2, "V", t_c, block_k, j, HELD)
    blocks(0.4, "O", t_r, block_q, i, WRITE)
    ax.text(0.25, -0.12, "HBM", ha="center", fontsize=11, weight="bold")
    _box(ax, 0.85, 0.05, 0.55, 1.5, "white")
    ax.text(1.125, -0.12, "SRAM (one SM)", ha="center", fontsize=11, weight="bold")
    _box(ax, 0.9, 1.15, 0.2, 0.3, HELD, "K$_j$")
    _box(ax, 1.15, 1.15, 0.2, 0.3, HELD, "V$_j$")
    _box(ax, 0.9, 0.7, 0.2, 0.3, READ, "Q$_i$")
    _box(ax, 1.15, 0.7, 0.2, 0.3, WRITE, "O$_i$, l$_i$, m$_i$")
    _box(ax, 0.95, 0.2, 0.35, 0.35, "tab:purple", "S$_{ij}$ = Q$_i$K$_j^T$\n(never in HBM)", alpha=0.6)
    _arrow(ax, (0.12, 1 - (i + 0.5) * block_q * u), (0.9, 0.85), READ)
    _arrow(ax, (0.7, 1.35), (0.9, 1.3), HELD)
    _arrow(ax, (1.25, 0.7), (0.52, 1 - (i + 0.5) * block_q * u), WRITE)
    traffic = outer_step_traffic(j, n, n, d, block_q=block_q, block_k=block_k)
    ax.text(
        0.0,
        -0.3,
        f"outer step j={j}: K$_j$, V$_j$ read once ({traffic.reads['K'] + traffic.reads['V']} elements); "
        f"for each of {t_r} query blocks: Q$_i$, O$_i$, l$_i$, m$_i$ read, O$_i$, l$_i$, m$_i$ written "
        f"({traffic.read_elements} read, {traffic.write_elements} written in the step)",
        fontsize=8,
    )
    ax.set_xlim(-0.05, 1.45)
    ax.set_ylim(-0.35, 1.65)
    legend = [Rectangle((0, 0), 1, 1, color=c) for c in (HELD, READ, WRITE)]
    ax.legend(
        legend,
        ["held for the outer step", "read each inner step", "written each inner step"],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
    )
    _blank(ax, f"Algorithm 1, outer step j={j}, inner step i={i} (N={n}, B_r={block_q}, B_c={block_k})")
    return traffic


# --- register_tiled: who owns which micro-tile ----------------------------------------------------


def tile_owners(
    ax_s: Axes, ax_o: Axes, owners, ax_reads: Axes | None = None, reads: dict | None = None
) -> None:
    """Colour each element of the S tile and the O tile by the thread that wrote it (numbers: thread
    index), from a :class:`flashlab.cuda.primer.TileOwners`; with ``ax_reads``, a bar per kernel of
    ``reads`` (kernel -> shared-memory reads per multiply-add)."""
    cmap = matplotlib.colormaps["tab20"]
    for ax, owned, what, cols in (
        (ax_s, owners.s, "S tile (P in shared memory)", "key"),
        (ax_o, owners.o, "O tile", "head column"),
    ):
        ax.imshow(owned % 20, cmap=cmap, vmin=0, vmax=19, aspect="equal")
        for (r, c), t in np.ndenumerate(owned):
            ax.text(c, r, str(t), ha="center", va="center", fontsize=7)
        ax.set_title(f"{what}: thread that writes each element", fontsize=10)
        ax.set_xlabel(cols)
        ax.set_ylabel("query row")
    if ax_reads is not None and reads:
        bars = ax_reads.bar(list(reads), list(reads.values()), color=["tab:gray", "tab:green"][: len(reads)])
        ax_reads.bar_label(bars, fmt="%.2f")
        ax_reads.set_ylabel("shared-memory reads per multiply-add")
        ax_reads.set_title("reads a micro-tile saves", fontsize=10)


# --- the backward's data flow ---------------------------------------------------------------------


def backward_flow(
    ax: Axes,
    n_q: int = 8,
    n_k: int = 8,
    *,
    block_q: int = 2,
    block_k: int = 2,
    j: int = 1,
    causal: bool = True,
) -> np.ndarray:
    """The tile grid of the backward with key block ``j``'s thread block highlighted: it holds
    ``K_j, V_j`` and accumulates ``dK_j, dV_j`` on chip, reads ``Q_i, dO_i, lse_i, D_i`` for each query
    block it sees, and atomically adds into each such ``dQ_i``. Right: how many thread blocks add
    into each ``dQ_i`` (returned, per query block)."""
    grid = tile_grid(n_q, n_k, block_q, block_k, causal)
    t_r, t_c = grid.shape
    for (i, jj), computed in np.ndenumerate(grid):
        color = (READ if jj == j else "0.7") if computed else "white"
        _box(ax, jj, t_r - 1 - i, 0.95, 0.95, color)
    adders = grid.sum(axis=1)
    for i, count in enumerate(adders):
        _box(ax, t_c + 0.5, t_r - 1 - i, 0.95, 0.95, WRITE if grid[i, j] else IDLE, f"dQ$_{i}$\n{count} adds")
        ax.text(-0.2, t_r - 1 - i + 0.45, f"Q$_{i}$, dO$_{i}$", ha="right", va="center", fontsize=8)
    for jj in range(t_c):
        ax.text(jj + 0.47, t_r + 0.1, f"K$_{jj}$,V$_{jj}$", ha="center", fontsize=8)
    _box(ax, j, -1.3, 0.95, 0.95, HELD, f"dK$_{j}$\ndV$_{j}$")
    ax.text(j + 0.47, -1.55, "on chip, written once", ha="center", va="top", fontsize=8)
    ax.set_xlim(-1.6, t_c + 1.6)
    ax.set_ylim(-2.0, t_r + 0.6)
    legend = [Rectangle((0, 0), 1, 1, color=c) for c in (READ, "0.7", WRITE, HELD)]
    ax.legend(
        legend,
        [f"tiles of thread block j={j}", "other blocks' tiles", "dQ: atomic adds", "dK, dV in registers"],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
    )
    _blank(
        ax,
        f"backward: one thread block per key block ({'causal' if causal else 'full'}, {t_r} x {t_c} tiles)",
    )
    return adders


# --- the primer: which thread touches which element -----------------------------------------------


def thread_map(
    ax: Axes,
    owners: np.ndarray,
    *,
    colour=None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    fontsize: float = 9,
):
    """Each element of a 1-d or 2-d array as a cell labelled with the thread that touched it
    (``-1``: none, left white), coloured by ``colour`` (same shape, e.g. the block or the warp;
    default the thread). Returns the labels drawn, row by row."""
    owners = np.atleast_2d(owners)
    colour = owners if colour is None else np.atleast_2d(colour)
    cmap = matplotlib.colormaps["tab20"]
    for (r, c), t in np.ndenumerate(owners):
        face = "white" if t < 0 else cmap(int(colour[r, c]) % 20)
        _box(ax, c, -r, 1, 1, face, None if t < 0 else str(t), fontsize)
    ax.set_xlim(0, owners.shape[1])
    ax.set_ylim(1 - owners.shape[0], 1)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for side in ax.spines.values():
        side.set_visible(False)
    return [t.get_text() for t in ax.texts]


def access_flow(ax: Axes, trace, steps: list[tuple[str, str]], size: int) -> list[list[int]]:
    """For each thread of a :class:`flashlab.cuda.primer.Trace`, a line through the element it touched
    at each of ``steps`` (``(array, "r" or "w")``, drawn top to bottom, ``size`` elements each).
    Returns, per thread, the element index at each step."""
    paths: dict[tuple, list[int]] = {}
    for row, (array, op) in enumerate(steps):
        for a in sorted(trace.of(array, op), key=lambda a: a.seq):
            paths.setdefault((a.block, a.thread), [None] * len(steps))[row] = a.index
    cmap = matplotlib.colormaps["tab20"]
    for row, (array, op) in enumerate(steps):
        for x in range(size):
            _box(ax, x, -2 * row, 0.9, 0.9, "white", str(x))
        ax.text(
            -0.3, -2 * row + 0.45, f"{array} ({'read' if op == 'r' else 'write'})", ha="right", va="center"
        )
    out = []
    for n, (_, idx) in enumerate(sorted(paths.items())):
        pts = [(i + 0.45, -2 * row + (0.9 if k == 0 else 0)) for row, i in enumerate(idx) for k in (0, 1)]
        xs, ys = zip(*[(x, y) for x, y in pts], strict=True)
        ax.plot(xs, ys, color=cmap(n % 20), lw=1.2)
        out.append(idx)
    ax.set_xlim(-4, size)
    ax.set_ylim(-2 * len(steps) + 1, 1.2)
    ax.set_axis_off()
    return out


def bank_passes(ax: Axes, request, *, banks: int = 32) -> int:
    """One warp request to shared memory: a column per bank, the lanes whose word sits there stacked
    in the order the bank serves them (a row per pass). Returns the number of passes."""
    words: dict[int, list] = {}
    for a in sorted(request, key=lambda a: a.thread):
        words.setdefault(a.index % banks, []).append(a)
    passes = max(len({a.index for a in w}) for w in words.values())
    for bank, lanes in words.items():
        for k, a in enumerate(lanes):
            _box(ax, bank, -k, 1, 1, matplotlib.colormaps["tab20"](a.thread % 20), str(a.thread % 32), 6)
    ax.set_xlim(0, banks)
    ax.set_ylim(1 - banks, 1)
    ax.set_aspect("equal")
    ax.set_xticks(np.arange(0, banks, 4) + 0.5, [str(b) for b in range(0, banks, 4)])
    ax.set_yticks([])
    ax.set_xlabel("bank")
    ax.set_ylabel("passes (one word per bank each)")
    ax.set_title(f"{passes} pass{'es' if passes > 1 else ''}", fontsize=10)
    return passes


def occupancy_limits(ax: Axes, occ) -> dict[str, int]:
    """Bars: how many blocks per SM each resource allows (a :class:`flashlab.cuda.primer.Occupancy`);
    the shortest bar, in orange, is the one that binds."""
    names = list(occ.limits)
    bars = ax.barh(
        names, [occ.limits[n] for n in names], color=[WRITE if n == occ.binding else "0.6" for n in names]
    )
    ax.bar_label(bars)
    ax.set_xlabel("blocks per SM the resource allows")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{occ.blocks} blocks = {occ.warps} warps per SM: occupancy {occ.fraction:.0%}", fontsize=10)
    return dict(occ.limits)
