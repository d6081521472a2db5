"""Blocked FlashAttention forward in NumPy: Algorithm 1 (FlashAttention) and FlashAttention-2.

Both loop orders walk the tile schedule of :mod:`flashlab.tiles` and never form an
``N_q x N_k`` array: at any time only one ``B_r x B_c`` tile of scores is alive ("on chip").
Each tile is vectorised over the leading (batch, head) dims.

``memory`` (a :class:`flashlab.memory.MemoryModel`) wraps the HBM tensors (Q, K, V, O, l, m, lse):
every slice the loops take or assign is counted by the wrapper, so the HBM traffic is observed, not
declared; the tiles held on chip are declared (``hold``/``free``). What the counts come to (chapter
3's closed forms rely on it):

- FA1 (Algorithm 1): line 2 (initialise ``O = 0, l = 0, m = -inf`` in HBM) is **not** counted;
  line 6 reads ``K_j, V_j``; line 8 reads ``Q_i, O_i, l_i, m_i``; lines 12-13 write
  ``O_i, l_i, m_i``. Reads ``2 N d + T_c (2 N d + 2 N)``, writes ``T_c (N d + 2 N)`` elements
  without causal masking. The ``lse = m + log l`` returned for ``return_lse`` is not part of
  Algorithm 1 and is not counted.
- FA2: per query block ``Q_i`` is read once, per tile ``K_j, V_j`` are read, and ``O_i`` and
  ``lse_i`` are written once. A query block that sees no key at all (causal with ``N_q > N_k``)
  reads nothing and writes its ``O_i = 0`` and ``lse_i = -inf``.
- Causal tiles skipped by :func:`flashlab.tiles.tile_grid` are neither read nor computed.
- SRAM (``hold``/``free``): ``Q_i``, ``K_j``, ``V_j``, ``O_i`` (FA2: the accumulator), ``m_i``,
  ``l_i`` and the score tile, held as ``S`` and then, once exponentiated in place, as ``P``.
  The peak is ``2 B_r d + 2 B_c d + B_r B_c + 2 B_r`` elements (``d_v = d``, full blocks) for both.

``m`` and ``l`` are the running max and sum of the *scaled* scores ``tau q . k``, so
``lse = m + log l`` matches :func:`flashlab.naive_attention`'s.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import NamedTuple

import numpy as np

from flashlab.inputs import attention_inputs, check_block
from flashlab.memory import hbm, host
from flashlab.tiles import (
    block_range,
    check_loop_order,
    first_row_block,
    last_col_block,
    n_blocks,
    tile_mask,
    tile_needs_mask,
)


class TileStep(NamedTuple):
    """One visit of tile ``(i, j)``, as recorded in ``trace``.

    ``m``, ``l`` ``(..., rows)`` and ``o`` ``(..., rows, d_v)`` are the running max, running sum and
    normalised partial output ``acc / l`` of the tile's query rows *after* the update (copies);
    all three are ``None`` for a skipped tile.
    """

    step: int
    loop_order: str
    i: int
    j: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    skipped: bool
    m: np.ndarray | None
    l: np.ndarray | None  # noqa: E741 (the paper's name)
    o: np.ndarray | None


def flash_attention(
    q,
    k,
    v,
    *,
    block_q=64,
    block_k=64,
    causal=False,
    scale=None,
    loop_order="fa2",
    return_lse=False,
    memory=None,
    trace=None,
    workers=1,
):
    """Exact softmax attention computed tile by tile (FlashAttention forward).

    Shapes: ``q (..., N_q, d)``, ``k (..., N_k, d)``, ``v (..., N_k, d_v)``; leading dims broadcast.
    Dtypes, ``scale`` (default ``1/sqrt(d)``), bottom-right ``causal`` alignment and fully masked
    rows (output 0, lse ``-inf``) are exactly as in :func:`flashlab.naive_attention`.

    ``block_q`` (B_r) and ``block_k`` (B_c): any positive integers; need not divide N.
    ``loop_order``: ``"fa1"`` (Algorithm 1: outer loop over key/value blocks, O, l, m through HBM
    every inner step) or ``"fa2"`` (FlashAttention-2: outer loop over query blocks, unnormalised
    O on chip, divided by l once; only lse written).
    ``memory``: optional :class:`flashlab.memory.MemoryModel` counting HBM traffic and SRAM tiles.
    ``trace``: optional list; every tile visit appends a :class:`TileStep` (skipped tiles too).
    ``workers``: FA2 only: run the independent query blocks on this many threads (the
    parallelism FlashAttention-2 uses across thread blocks). The result is the same; BLAS's own
    threads compete with these, so limit them to one (e.g. with ``threadpoolctl``) when timing.

    Returns ``o (..., N_q, d_v)`` or ``(o, lse)`` with ``lse (..., N_q)`` in the compute dtype.
    """
    a = attention_inputs(q, k, v, scale)
    block_q, block_k = check_block("block_q", block_q), check_block("block_k", block_k)
    workers = _check_workers(workers, check_loop_order(loop_order), memory, trace)
    run = _fa1 if loop_order == "fa1" else partial(_fa2, workers=workers)
    batch = a.q.shape[:-2]
    n_q, d_v = a.q.shape[-2], a.v.shape[-1]
    # Leading dims flattened to one batch axis B: every tile op below is one call over all of B.
    q3, k3, v3 = (x.reshape((math.prod(batch),) + x.shape[-2:]) for x in (a.q, a.k, a.v))
    q3, k3, v3 = hbm(memory, "Q", q3), hbm(memory, "K", k3), hbm(memory, "V", v3)  # slices counted
    o, lse = run(q3, k3, v3, a.scale, block_q, block_k, causal, memory, trace, batch)
    o = o.reshape(batch + (n_q, d_v)).astype(a.out_dtype, copy=False)
    return (o, lse.reshape(batch + (n_q,))) if return_lse else o


def _check_workers(workers, loop_order, memory, trace) -> int:
    """A positive thread count; more than one only for FA2 without ``memory`` or ``trace``."""
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer (threads over query blocks), got {workers!r}")
    if workers > 1 and loop_order == "fa1":
        raise ValueError(
            "workers > 1 needs loop_order='fa2': FA1's inner loop updates every O_i for each key block, "
            "so its steps depend on each other; FA2's query blocks do not"
        )
    if workers > 1 and (memory is not None or trace is not None):
        raise ValueError(
            "workers > 1 runs query blocks concurrently; memory counting and trace need workers=1"
        )
    return int(workers)


def _record(trace, loop_order, i, j, block_q, block_k, n_q, n_k, batch, m=None, l=None, o=None):  # noqa: E741
    """Append one :class:`TileStep` (``m, l, o`` given for a computed tile, in the flat batch)."""
    rows, cols = block_range(i, block_q, n_q), block_range(j, block_k, n_k)
    shaped = [None if x is None else x.reshape(batch + x.shape[1:]).copy() for x in (m, l, o)]
    trace.append(TileStep(len(trace), loop_order, i, j, rows, cols, m is None, *shaped))


def _safe_max(m: np.ndarray) -> np.ndarray:
    """``m`` with ``-inf`` (a row that has seen no key yet) replaced by 0, so ``exp(x - m)`` is 0, not nan."""
    return np.where(np.isneginf(m), 0.0, m)


def _fa1(q, k, v, scale, block_q, block_k, causal, memory, trace, batch):
    """Algorithm 1 of FlashAttention (Dao et al., 2022), line by line, on flat ``(B, N, d)`` arrays."""
    n_b, n_q, n_k, d_v = q.shape[0], q.shape[1], k.shape[1], v.shape[2]
    # Line 2: O = 0, l = 0, m = -inf "in HBM" (not counted as traffic, see the module docstring).
    o = hbm(memory, "O", np.zeros((n_b, n_q, d_v), q.dtype))
    l_hbm = hbm(memory, "l", np.zeros((n_b, n_q), q.dtype))
    m_hbm = hbm(memory, "m", np.full((n_b, n_q), -np.inf, q.dtype))
    t_r, t_c = n_blocks(n_q, block_q), n_blocks(n_k, block_k)
    for j in range(t_c):  # line 5
        c0, c1 = block_range(j, block_k, n_k)
        k_j, v_j = k[:, c0:c1], v[:, c0:c1]  # line 6: load K_j, V_j from HBM to SRAM
        if memory is not None:
            memory.hold("K", k_j)
            memory.hold("V", v_j)
        first = first_row_block(j, n_q, n_k, block_q, block_k, causal)
        for i in range(t_r):  # line 7
            if i < first:  # causal: tile (i, j) lies entirely above the diagonal
                if trace is not None:
                    _record(trace, "fa1", i, j, block_q, block_k, n_q, n_k, batch)
                continue
            r0, r1 = block_range(i, block_q, n_q)
            # line 8: load Q_i, O_i, l_i, m_i from HBM to SRAM
            q_i, o_i, l_i, m_i = q[:, r0:r1], o[:, r0:r1], l_hbm[:, r0:r1], m_hbm[:, r0:r1]
            if memory is not None:
                for name, tile in (("Q", q_i), ("O", o_i), ("l", l_i), ("m", m_i)):
                    memory.hold(name, tile)
            s = q_i @ np.swapaxes(k_j, 1, 2)  # line 9: S_ij = tau Q_i K_j^T
            s *= scale
            if memory is not None:
                memory.hold("S", s)
            if causal and tile_needs_mask(i, j, n_q, n_k, block_q, block_k):
                s[:, tile_mask((r0, r1), (c0, c1), n_q, n_k)] = -np.inf
            # Line 10: m~ = rowmax(S), P~ = exp(S - m~), l~ = rowsum(P~).
            m_t = s.max(axis=2)
            s -= _safe_max(m_t)[:, :, None]
            p = np.exp(s, out=s)  # in place: S_ij becomes P~_ij
            if memory is not None:
                memory.free("S")
                memory.hold("P", p)
            l_t = p.sum(axis=2)
            # Line 11: m_new = max(m_i, m~), l_new = e^(m_i - m_new) l_i + e^(m~ - m_new) l~.
            m_new = np.maximum(m_i, m_t)
            alpha = np.exp(m_i - _safe_max(m_new))
            beta = np.exp(m_t - _safe_max(m_new))
            l_new = alpha * l_i + beta * l_t
            # Line 12: O_i = diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~ - m_new) P~ V_j).
            num = (alpha * l_i)[:, :, None] * o_i + beta[:, :, None] * (p @ v_j)
            o_new = num / np.where(l_new > 0, l_new, 1.0)[:, :, None]
            o[:, r0:r1] = o_new  # lines 12-13: write O_i, l_i, m_i to HBM
            l_hbm[:, r0:r1], m_hbm[:, r0:r1] = l_new, m_new
            if memory is not None:
                memory.free("Q", "O", "l", "m", "P")
            if trace is not None:
                _record(trace, "fa1", i, j, block_q, block_k, n_q, n_k, batch, m_new, l_new, o_new)
        if memory is not None:
            memory.free("K", "V")
    return host(o), _lse(host(m_hbm), host(l_hbm))


def _fa2(q, k, v, scale, block_q, block_k, causal, memory, trace, batch, workers=1):
    """FlashAttention-2 forward (Dao, 2023, Algorithm 1 of that paper) on flat ``(B, N, d)`` arrays.

    Outer loop over query blocks ``i`` (:func:`_fa2_query_block` does one). The blocks are
    independent, which is what FlashAttention-2 parallelises on a GPU; here ``workers > 1`` runs
    them on that many threads (NumPy releases the GIL inside its array operations).
    """
    n_b, n_q, d_v = q.shape[0], q.shape[1], v.shape[2]
    o = hbm(memory, "O", np.empty((n_b, n_q, d_v), q.dtype))
    lse = hbm(memory, "lse", np.empty((n_b, n_q), q.dtype))
    query_block = partial(
        _fa2_query_block, q, k, v, o, lse, scale, block_q, block_k, causal, memory, trace, batch
    )
    t_r = n_blocks(n_q, block_q)
    if workers == 1:
        for i in range(t_r):
            query_block(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(query_block, range(t_r)):  # re-raises a worker's exception
                pass
    return host(o), host(lse)


def _fa2_query_block(q, k, v, o, lse, scale, block_q, block_k, causal, memory, trace, batch, i):
    """FA2 for query block ``i``: fills ``o[:, rows(i)]`` and ``lse[:, rows(i)]``.

    ``Q_i`` is loaded once; the unnormalised accumulator ``acc = O_i``, running max ``m_i`` and
    sum ``l_i`` stay on chip. Inner loop over key blocks ``j``: ``S = tau Q_i K_j^T``,
    ``m_new = max(m_i, rowmax S)``, ``P = exp(S - m_new)``, ``l_i = e^(m_i - m_new) l_i + rowsum P``,
    ``acc = e^(m_i - m_new) acc + P V_j``. After the inner loop, ``O_i = acc / l_i`` and
    ``lse_i = m_i + log l_i`` are written once.

    Speed: the score tile lives in one buffer and is turned into ``P`` in place; the softmax scale
    is folded into ``Q_i`` once per query block.
    """
    n_b, n_q, n_k, d_v = q.shape[0], q.shape[1], k.shape[1], v.shape[2]
    r0, r1 = block_range(i, block_q, n_q)
    rows = r1 - r0
    last = last_col_block(i, n_q, n_k, block_q, block_k, causal)
    # Rows that see no key at all (causal, N_q > N_k) keep m = -inf: exp needs a safe max.
    dead_rows = causal and r0 + n_k - n_q < 0
    if last >= 0:
        q_i = q[:, r0:r1]  # load Q_i from HBM to SRAM
        if memory is not None:
            memory.hold("Q", q_i)
        q_i = q_i * scale
        acc = np.zeros((n_b, rows, d_v), q.dtype)
        m_i = np.full((n_b, rows), -np.inf, q.dtype)
        l_i = np.zeros((n_b, rows), q.dtype)
        if memory is not None:  # on chip: O_i accumulator, m_i, l_i
            memory.hold("O", acc)
            memory.hold("m", m_i)
            memory.hold("l", l_i)
        s_buf = np.empty(n_b * rows * min(block_k, n_k), q.dtype)
        pv = np.empty((n_b, rows, d_v), q.dtype)
    for j in range(last + 1):
        c0, c1 = block_range(j, block_k, n_k)
        k_j, v_j = k[:, c0:c1], v[:, c0:c1]  # load K_j, V_j from HBM to SRAM
        if memory is not None:
            memory.hold("K", k_j)
            memory.hold("V", v_j)
        s = s_buf[: n_b * rows * (c1 - c0)].reshape(n_b, rows, c1 - c0)
        np.matmul(q_i, np.swapaxes(k_j, 1, 2), out=s)  # S_ij = tau Q_i K_j^T
        if memory is not None:
            memory.hold("S", s)
        if causal and tile_needs_mask(i, j, n_q, n_k, block_q, block_k):
            np.copyto(s, -np.inf, where=tile_mask((r0, r1), (c0, c1), n_q, n_k))
        m_new = np.maximum(m_i, s.max(axis=2))
        m_use = _safe_max(m_new) if dead_rows else m_new
        s -= m_use[:, :, None]
        p = np.exp(s, out=s)  # P_ij = exp(S_ij - m_new), in place
        if memory is not None:
            memory.free("S")
            memory.hold("P", p)
        alpha = np.exp(m_i - m_use)  # rescales what was accumulated so far (0 at j = 0)
        l_i *= alpha
        l_i += p.sum(axis=2)
        acc *= alpha[:, :, None]
        acc += np.matmul(p, v_j, out=pv)
        m_i = m_new
        if memory is not None:
            memory.free("K", "V", "P")
        if trace is not None:
            _record(trace, "fa2", i, j, block_q, block_k, n_q, n_k, batch, m_i, l_i, _normalise(acc, l_i))
    if last >= 0:  # O_i = diag(l_i)^-1 acc, lse_i = m_i + log l_i, written to HBM once
        o[:, r0:r1] = _normalise(acc, l_i)
        lse[:, r0:r1] = _lse(m_i, l_i)
    else:  # causal: this query block sees no key; nothing to load or compute
        o[:, r0:r1] = 0.0
        lse[:, r0:r1] = -np.inf
    if memory is not None:
        memory.free("Q", "O", "m", "l")
    if trace is not None:
        for j in range(last + 1, n_blocks(n_k, block_k)):
            _record(trace, "fa2", i, j, block_q, block_k, n_q, n_k, batch)


def _normalise(acc: np.ndarray, l: np.ndarray) -> np.ndarray:  # noqa: E741
    """``acc / l`` row-wise, with 0 where ``l = 0`` (a row that has seen no key)."""
    return acc / np.where(l > 0, l, 1.0)[:, :, None]


def _lse(m: np.ndarray, l: np.ndarray) -> np.ndarray:  # noqa: E741
    """``lse = m + log l``, ``-inf`` where ``l = 0`` (a row that saw no key)."""
    with np.errstate(divide="ignore"):
        return np.where(l > 0, m + np.log(l), -np.inf)
