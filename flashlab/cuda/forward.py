"""numba.cuda FlashAttention forward kernels, from the simplest to the fast one.

Every kernel here is the *source* of a CUDA kernel: a plain Python function that
:func:`flashlab.cuda.flash_attention` hands to ``numba.cuda.jit`` on a GPU, runs in numba's CUDA
simulator otherwise, and that :mod:`flashlab.cuda.traffic` runs in the simulator over counting
arrays. The same source runs in all three places. Each ``*_spec`` function is the registry's
factory for one kernel (:mod:`flashlab.cuda.registry`): it checks the tiles and returns the
:class:`~flashlab.cuda.spec.KernelSpec` that says how to launch it.

All kernels take the same arguments, float32, leading (batch, head) dims flattened into one:

    q (BH, N_q, d), k (BH, N_k, d), v (BH, N_k, d)   inputs, C-contiguous
    o (BH, N_q, d), lse (BH, N_q)                     outputs (lse = m + log l, natural log)
    n_q, n_k (int), scale (float32), offset (int)     offset = N_k - N_q (bottom-right causal)

The grid is the paper's outer loop: thread block ``(x, y)`` owns query rows
``x*rows .. x*rows + rows - 1`` of head ``y`` (FlashAttention-2 order: each block keeps its
rows' O, m, l on chip and walks over all key/value tiles). Shared memory is the paper's SRAM.

1. :func:`rowwise_source`: one thread per query row; the block stages each K/V tile in shared
   memory; each thread runs the online softmax key by key (two exps per key).
2. :func:`tiled_source`: the block cooperates on a ``rows x keys`` tile of S in shared memory,
   one thread per score; one thread per row updates m and l once per tile; O lives in shared memory.
3. :func:`register_tiled_source`: each thread owns a ``tm x tn`` micro-tile of S and a
   ``tm x d/g`` micro-tile of O in registers (compile-time sized local arrays), so every value it
   reads from shared memory feeds ``tm`` or ``tn`` multiply-adds; causal tiles above the diagonal
   are skipped. This is the fast one.

Tile sizes are compile-time constants (the factories close over them and are cached), so numba
can keep local arrays in registers and unroll the loops over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import numpy as np
from numba import cuda, float32, int64, uint64

from flashlab.cuda import microtiles
from flashlab.cuda.spec import STATIC_SHARED_LIMIT, KernelSpec, check_divides, python_function

HEAD_DIMS = (16, 32, 64, 128)
PARAMS = ("q", "k", "v", "o", "lse", "n_q", "n_k", "scale", "offset")
SIGNATURE = (
    "void(float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], "
    "float32[:, ::1], int64, int64, float32, int64)"
)

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
NEG_INF = np.float32(-np.inf)
LOG2E = np.float32(math.log2(math.e))  # exp(x) = exp2(x * log2(e))
LN2 = np.float32(math.log(2.0))


# --------------------------------------------------------------------------------------------------
# 1. rowwise: one thread per query row
# --------------------------------------------------------------------------------------------------


def rowwise_key_step(q_row, k_tile, v_tile, jj, scale, m, l, acc):  # noqa: E741 (the paper's l)
    """The inner loop's body for one key ``jj`` of the staged tile (one row of Algorithm 1, lines 9-12).

    ``q_row (d,)`` and ``acc (d,)`` are this thread's registers, ``k_tile``/``v_tile (keys, d)``
    the shared-memory tiles. Score ``s = scale * q . k_jj``; new max ``m' = max(m, s)``;
    ``alpha = exp(m - m')`` rescales the old sum and accumulator; ``p = exp(s - m')`` weighs v_jj.
    Returns the new ``(m, l)``; ``acc`` is updated in place.
    """
    s = float32(0.0)
    for c in range(q_row.shape[0]):
        s += q_row[c] * k_tile[jj, c]
    s *= scale
    m_new = max(m, s)
    alpha = math.exp(m - m_new)
    p = math.exp(s - m_new)
    for c in range(acc.shape[0]):
        acc[c] = acc[c] * alpha + p * v_tile[jj, c]
    return m_new, l * alpha + p


@cache
def rowwise_source(
    d: int,
    rows: int,
    keys: int,
    causal: bool,
    key_step: Callable = rowwise_key_step,
    device: Callable = python_function,
):
    """Kernel 1: ``rows`` threads per block, one query row each; K/V staged ``keys`` rows at a time.

    ``key_step(q_row, k_tile, v_tile, jj, scale, m, l, acc) -> (m, l)`` is the inner loop's body,
    passed through ``device`` (``cuda.jit(device=True)`` on a GPU; any Python function in the simulator).
    """
    D, BR, BC = d, rows, keys
    key_step = device(key_step)

    def rowwise(q, k, v, o, lse, n_q, n_k, scale, offset):
        bh = cuda.blockIdx.y
        r0 = cuda.blockIdx.x * BR
        t = cuda.threadIdx.x
        i = r0 + t  # this thread's query row
        k_tile = cuda.shared.array((BC, D), float32)
        v_tile = cuda.shared.array((BC, D), float32)
        q_row = cuda.local.array(D, float32)
        acc = cuda.local.array(D, float32)
        last_row = min(r0 + BR, n_q) - 1
        n_keys = min(n_k, last_row + offset + 1) if causal else n_k  # tiles past the diagonal: skipped
        for c in range(D):
            q_row[c] = q[bh, i, c] if i < n_q and n_keys > 0 else ZERO
            acc[c] = ZERO
        m = NEG_INF
        l = ZERO  # noqa: E741
        for j0 in range(0, n_keys, BC):
            for e in range(t, BC * D, BR):  # the block loads the K/V tile together, coalesced
                jj = e // D
                c = e % D
                if j0 + jj < n_k:
                    k_tile[jj, c] = k[bh, j0 + jj, c]
                    v_tile[jj, c] = v[bh, j0 + jj, c]
            cuda.syncthreads()
            stop = min(BC, n_k - j0) if i < n_q else 0
            if causal:
                stop = min(stop, i + offset + 1 - j0)  # keys this row may see
            for jj in range(stop):
                m, l = key_step(q_row, k_tile, v_tile, jj, scale, m, l, acc)  # noqa: E741
            cuda.syncthreads()
        if i < n_q:
            inv = ONE / l if l > ZERO else ZERO
            for c in range(D):
                o[bh, i, c] = acc[c] * inv
            lse[bh, i] = m + math.log(l) if l > ZERO else NEG_INF

    return rowwise


# --------------------------------------------------------------------------------------------------
# 2. tiled: the block cooperates on a rows x keys tile of S
# --------------------------------------------------------------------------------------------------


@cache
def tiled_source(d: int, rows: int, keys: int, causal: bool):
    """Kernel 2: a ``(keys, rows)`` thread block; thread ``(x, y)`` computes score ``S[y, x]``.

    Per K/V tile: (a) every thread one score from the Q and K tiles in shared memory; (b) one
    thread per row finds the tile's row max, rescales with ``alpha = exp(m_old - m_new)`` and
    turns scores into ``P`` in place (FA2: O stays unnormalised); (c) the block updates the O tile,
    ``O = alpha * O + P V``, in shared memory. O is divided by l once at the end.
    """
    D, BR, BC = d, rows, keys
    T = BR * BC

    def tiled(q, k, v, o, lse, n_q, n_k, scale, offset):
        bh = cuda.blockIdx.y
        r0 = cuda.blockIdx.x * BR
        tx = cuda.threadIdx.x  # key column in the tile
        ty = cuda.threadIdx.y  # query row in the tile
        t = ty * BC + tx
        q_tile = cuda.shared.array((BR, D), float32)
        k_tile = cuda.shared.array((BC, D), float32)
        v_tile = cuda.shared.array((BC, D), float32)
        o_tile = cuda.shared.array((BR, D), float32)
        s_tile = cuda.shared.array((BR, BC), float32)
        m_row = cuda.shared.array(BR, float32)
        l_row = cuda.shared.array(BR, float32)
        alpha_row = cuda.shared.array(BR, float32)
        last_row = min(r0 + BR, n_q) - 1
        n_keys = min(n_k, last_row + offset + 1) if causal else n_k
        for e in range(t, BR * D, T):
            r = e // D
            c = e % D
            q_tile[r, c] = q[bh, r0 + r, c] if r0 + r < n_q and n_keys > 0 else ZERO
            o_tile[r, c] = ZERO
        if tx == 0:
            m_row[ty] = NEG_INF
            l_row[ty] = ZERO
        for j0 in range(0, n_keys, BC):
            for e in range(t, BC * D, T):
                jj = e // D
                c = e % D
                inside = j0 + jj < n_k
                k_tile[jj, c] = k[bh, j0 + jj, c] if inside else ZERO
                v_tile[jj, c] = v[bh, j0 + jj, c] if inside else ZERO
            cuda.syncthreads()
            # (a) one score per thread
            s = ZERO
            for c in range(D):
                s += q_tile[ty, c] * k_tile[tx, c]
            j = j0 + tx
            if j >= n_k or (causal and j > r0 + ty + offset):
                s = NEG_INF
            s_tile[ty, tx] = s * scale
            cuda.syncthreads()
            # (b) one thread per row: the online softmax for this tile
            if tx == 0:
                m_old = m_row[ty]
                m_new = m_old
                for jj in range(BC):
                    m_new = max(m_new, s_tile[ty, jj])
                m_use = ZERO if m_new == NEG_INF else m_new  # a fully masked row stays 0, never nan
                alpha = math.exp(m_old - m_use)
                total = ZERO
                for jj in range(BC):
                    p = math.exp(s_tile[ty, jj] - m_use)
                    s_tile[ty, jj] = p
                    total += p
                m_row[ty] = m_new
                l_row[ty] = l_row[ty] * alpha + total
                alpha_row[ty] = alpha
            cuda.syncthreads()
            # (c) O = alpha * O + P V, every thread a few elements of the O tile
            for e in range(t, BR * D, T):
                r = e // D
                c = e % D
                acc = o_tile[r, c] * alpha_row[r]
                for jj in range(BC):
                    acc += s_tile[r, jj] * v_tile[jj, c]
                o_tile[r, c] = acc
            cuda.syncthreads()
        for e in range(t, BR * D, T):
            r = e // D
            c = e % D
            if r0 + r < n_q:
                l = l_row[r]  # noqa: E741
                o[bh, r0 + r, c] = o_tile[r, c] / l if l > ZERO else ZERO
        if tx == 0 and r0 + ty < n_q:
            l = l_row[ty]  # noqa: E741
            lse[bh, r0 + ty] = m_row[ty] + math.log(l) if l > ZERO else NEG_INF

    return tiled


# --------------------------------------------------------------------------------------------------
# 3. register_tiled: micro-tiles of S and O in registers
# --------------------------------------------------------------------------------------------------


class RegisterLayout(NamedTuple):
    """Where each tile of :func:`register_tiled_source` sits in its dynamic shared memory (floats).

    All tiles are row-major: ``Q[r, c]`` (row stride ``d + 4``), ``K[j, c]`` (stride ``d + 4``),
    ``P[r, j]`` (stride ``keys + g``; it reuses K's space once S is done), ``V[j, c]`` (stride d)
    and ``red[r, h]`` (stride g: the g per-thread partial row maxima and sums of row r).
    Every row starts on a 16-byte boundary, so ``unroll`` adjacent floats can be read by one
    8- or 16-byte load; the paddings shift consecutive rows by 4 (Q, K) or g (P) banks, so the
    rows one warp reads at once sit on different banks.
    """

    q: int
    k: int
    p: int
    v: int
    red: int
    floats: int
    q_stride: int
    k_stride: int
    p_stride: int


def register_layout(d: int, rows: int, keys: int, g: int) -> RegisterLayout:
    q_stride, k_stride, p_stride = d + 4, d + 4, keys + g
    k = rows * q_stride
    v = k + max(keys * k_stride, rows * p_stride)
    red = v + keys * d
    return RegisterLayout(0, k, k, v, red, red + rows * g, q_stride, k_stride, p_stride)


LOAD_COLUMNS = 8  # adjacent K/V columns a thread copies per step: 16 global loads in flight, then 16 stores
INDEX_TYPES = {"unsigned": uint64, "signed": int64}  # register_tiled's shared-memory index type


@cache
def register_tiled_source(
    d: int,
    rows: int,
    keys: int,
    tm: int,
    tn: int,
    g: int,
    causal: bool,
    unroll: int = 1,
    device: Callable = python_function,
    load_columns: int = 8,
    index=uint64,
):
    """Kernel 3: ``(rows / tm) * g`` threads; thread ``(rg, cg) = divmod(tid, g)`` owns

    - S rows ``rg + R*a`` (a < tm, R = rows/tm) by key columns ``cg + g*b`` (b < tn; keys = g*tn),
    - O rows ``rg + R*a`` by head columns ``col(b)`` (b < d/g): runs of ``w = min(4, d/g)``
      adjacent columns, ``cg*w + (b % w)`` in each stretch of ``w*g`` columns,
    in registers. The ``g`` threads of a row read one K (or V) row each at the same time: with the
    paddings of :class:`RegisterLayout`, on distinct banks.
    Per K/V tile: S = Q K^T from shared memory (:func:`flashlab.cuda.microtiles.product`),
    ``unroll`` steps of the dot product at a time: the ``unroll`` adjacent values of each Q row and
    K row a thread needs are read by one 8- or 16-byte load, and each feeds tn (Q) or tm (K)
    multiply-adds. Q was scaled by ``scale * log2(e)`` once, when loaded, so that ``exp2`` is the
    exponential. Then: mask (only in tiles that cross the diagonal or the end of K), row max across
    the row's ``g`` threads through shared memory, ``alpha``-rescale of O and l, P to shared memory,
    O += P V (:func:`~flashlab.cuda.microtiles.accumulate`), ``unroll`` keys at a time in the same
    way. Row sums are combined across threads only once, at the end (each thread keeps its columns'
    partial l).
    K/V tiles are single-buffered: numba has no asynchronous global-to-shared copy (``cp.async``),
    so a second buffer could only remove one of the four barriers per tile, not hide the loads;
    each thread issues ``load_columns`` loads of K and of V before it stores any of them
    (:func:`~flashlab.cuda.microtiles.stage`). Shared-memory indices are cast to ``index``: ``uint64``
    (numba then skips the negative-index wrap-around test it emits for signed indices), or ``int64``
    to measure what that test costs (``python -m flashlab.bench kernels``).
    """
    D, BR, BC, TM, TN, G, UN, LC, IDX = d, rows, keys, tm, tn, g, unroll, load_columns, index
    R = BR // TM  # row groups
    TD = D // G  # O columns per thread
    W = min(4, TD)  # O columns a thread owns side by side
    T = R * G  # threads per block
    lay = register_layout(D, BR, BC, G)
    KB, PB, VB, RB = lay.k, lay.p, lay.v, lay.red  # tile offsets (Q at 0)
    QS, KS, PST = lay.q_stride, lay.k_stride, lay.p_stride
    CAUSAL = causal
    stage = device(microtiles.stage(BC, D, LC, T, IDX))
    product = device(microtiles.product(TM, TN, R, G, D, UN, IDX))
    accumulate = device(microtiles.accumulate(TM, TD, R, G, BC, UN, IDX))

    def register_tiled(q, k, v, o, lse, n_q, n_k, scale, offset):
        smem = cuda.shared.array(0, float32)
        s = cuda.local.array((TM, TN), float32)
        acc = cuda.local.array((TM, TD), float32)
        m_i = cuda.local.array(TM, float32)
        l_i = cuda.local.array(TM, float32)
        qf = cuda.local.array((TM, UN), float32)
        kf = cuda.local.array((TN, UN), float32)
        vf = cuda.local.array((UN, TD), float32)
        kr = cuda.local.array(LC, float32)
        vr = cuda.local.array(LC, float32)
        bh = cuda.blockIdx.y
        r0 = cuda.blockIdx.x * BR
        tid = cuda.threadIdx.x
        rg = tid // G
        cg = tid % G
        scale2 = scale * LOG2E
        last_row = min(r0 + BR, n_q) - 1
        n_keys = min(n_k, last_row + offset + 1) if CAUSAL else n_k  # skip tiles above the diagonal
        for e in range(tid, BR * D, T):  # Q tile, loaded once (if any key is visible), pre-scaled
            r = e // D
            c = e % D
            smem[IDX(r * QS + c)] = q[bh, r0 + r, c] * scale2 if r0 + r < n_q and n_keys > 0 else ZERO
        for a in range(TM):
            m_i[a] = NEG_INF
            l_i[a] = ZERO
            for b in range(TD):
                acc[a, b] = ZERO
        for j0 in range(0, n_keys, BC):
            stage(smem, KB, KS, VB, D, k, v, bh, j0, n_k, ONE, kr, vr, tid)  # K and V tiles
            cuda.syncthreads()
            product(smem, s, qf, kf, 0, QS, KB, KS, rg, cg)  # S micro-tile = Q K^T
            edge = j0 + BC > n_k or (CAUSAL and j0 + BC - 1 > r0 + offset)  # tile needs masking
            for a in range(TM):
                i = r0 + rg + R * a
                mx = m_i[a]
                for b in range(TN):
                    if edge:
                        j = j0 + cg + G * b
                        if j >= n_k or (CAUSAL and j > i + offset):
                            s[a, b] = NEG_INF
                    mx = max(mx, s[a, b])
                smem[IDX(RB + (rg + R * a) * G + cg)] = mx
            cuda.syncthreads()  # partial maxima written; K no longer read (P may overwrite it)
            for a in range(TM):
                r = rg + R * a
                mx = m_i[a]
                for h in range(G):
                    mx = max(mx, smem[IDX(RB + r * G + h)])
                m_use = ZERO if mx == NEG_INF else mx  # a fully masked row stays 0, never nan
                alpha = math.exp2(m_i[a] - m_use)
                m_i[a] = mx
                l_i[a] *= alpha
                for b in range(TD):
                    acc[a, b] *= alpha
                for b in range(TN):
                    p = math.exp2(s[a, b] - m_use)
                    l_i[a] += p
                    smem[IDX(PB + r * PST + cg + G * b)] = p
            cuda.syncthreads()
            accumulate(smem, acc, qf, vf, PB, PST, VB, D, rg, cg)  # O micro-tile += P V
            cuda.syncthreads()
        for a in range(TM):  # the row sum l: add the g partial sums of each row
            smem[IDX(RB + (rg + R * a) * G + cg)] = l_i[a]
        cuda.syncthreads()
        for a in range(TM):
            r = rg + R * a
            i = r0 + r
            if i < n_q:
                l = ZERO  # noqa: E741
                for h in range(G):
                    l += smem[IDX(RB + r * G + h)]  # noqa: E741
                inv = ONE / l if l > ZERO else ZERO
                for b in range(TD):
                    o[bh, i, b // W * W * G + cg * W + b % W] = acc[a, b] * inv
                if cg == 0:
                    lse[bh, i] = (m_i[a] + math.log2(l)) * LN2 if l > ZERO else NEG_INF

    return register_tiled


# --------------------------------------------------------------------------------------------------
# choosing tile sizes and building a KernelSpec
# --------------------------------------------------------------------------------------------------

ROWWISE_TILES = {d: {"rows": 128, "keys": 32} for d in HEAD_DIMS}
TILED_TILES = {d: {"rows": 16, "keys": 16} for d in HEAD_DIMS}
REGISTER_TILED_TILES = {
    16: {"rows": 128, "keys": 64, "tm": 4, "tn": 8, "g": 8, "unroll": 4, "load_columns": 8},
    32: {"rows": 128, "keys": 64, "tm": 4, "tn": 8, "g": 8, "unroll": 4, "load_columns": 8},
    64: {"rows": 128, "keys": 64, "tm": 4, "tn": 8, "g": 8, "unroll": 4, "load_columns": 8},
    128: {"rows": 128, "keys": 64, "tm": 8, "tn": 4, "g": 16, "unroll": 4, "load_columns": 8},
}


def query_grid(rows: int):
    """The forward grid: thread block ``(x, y)`` owns query rows ``x*rows ...`` of head ``y``."""

    def grid(args) -> tuple:
        return (math.ceil(args["n_q"] / rows), args["q"].shape[0])

    return grid


def _spec(name, d, causal, source, t, block, shared_bytes, target) -> KernelSpec:
    return KernelSpec(
        name, d, causal, source, PARAMS, query_grid(t["rows"]), block, shared_bytes, SIGNATURE,
        tuple(t.items()), target,
    )  # fmt: skip


def rowwise_spec(d: int, causal: bool, t: dict, device: Callable, target: str, key_step=None) -> KernelSpec:
    """Kernel 1's spec; tiles ``rows`` (threads, one query row each) and ``keys`` (K/V rows staged)."""
    if 2 * t["keys"] * d * 4 > STATIC_SHARED_LIMIT:
        raise ValueError(f"rowwise: keys={t['keys']} with d={d} needs more than 48 KiB of shared memory")
    src = rowwise_source(d, t["rows"], t["keys"], causal, key_step or rowwise_key_step, device)
    return _spec("rowwise", d, causal, src, t, (t["rows"],), 0, target)


def tiled_spec(d: int, causal: bool, t: dict, device: Callable, target: str) -> KernelSpec:
    """Kernel 2's spec; tiles ``rows`` x ``keys`` threads (one score each)."""
    if t["rows"] * t["keys"] > 1024:
        raise ValueError(f"tiled: rows*keys={t['rows'] * t['keys']} threads > 1024 per block")
    floats = (2 * t["rows"] + 2 * t["keys"]) * d + t["rows"] * t["keys"] + 3 * t["rows"]
    if 4 * floats > STATIC_SHARED_LIMIT:
        raise ValueError(f"tiled: tiles rows={t['rows']}, keys={t['keys']} need > 48 KiB shared memory")
    src = tiled_source(d, t["rows"], t["keys"], causal)
    return _spec("tiled", d, causal, src, t, (t["keys"], t["rows"]), 0, target)


def register_tiled_spec(
    d: int, causal: bool, t: dict, device: Callable, target: str, index: str = "unsigned"
) -> KernelSpec:
    """Kernel 3's spec; tiles ``rows, keys, tm, tn, g, unroll, load_columns``: rows = tm * R,
    keys = g * tn, g divides d, unroll divides d and keys, load_columns divides d,
    (rows / tm) * g <= 1024 threads. ``index``: ``"unsigned"`` or ``"signed"`` shared-memory indices."""
    rows, keys, tm, tn, g, unroll = (t[x] for x in ("rows", "keys", "tm", "tn", "g", "unroll"))
    if index not in INDEX_TYPES:
        raise ValueError(f"register_tiled: index must be one of {', '.join(INDEX_TYPES)}, got {index!r}")
    check_divides("register_tiled", d, "d", t["load_columns"], "load_columns")
    check_divides("register_tiled", rows, "rows", tm, "tm")
    check_divides("register_tiled", d, "d", g, "g")
    check_divides("register_tiled", d, "d", unroll, "unroll")
    check_divides("register_tiled", keys, "keys", unroll, "unroll")
    if keys != g * tn:
        raise ValueError(f"register_tiled: keys={keys} must equal g*tn={g * tn}")
    threads = rows // tm * g
    if threads > 1024:
        raise ValueError(f"register_tiled: (rows/tm)*g = {threads} threads > 1024 per block")
    src = register_tiled_source(
        d, rows, keys, tm, tn, g, causal, unroll, device, t["load_columns"], INDEX_TYPES[index]
    )
    shared = 4 * register_layout(d, rows, keys, g).floats
    return _spec("register_tiled", d, causal, src, t, (threads,), shared, target)
