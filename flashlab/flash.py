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
- Masks (``causal=True`` and ``mask=``) are tiles (:mod:`flashlab.masks`): every tile is classified
  once as empty, partial or full. An empty tile is neither read nor computed (FA1 does not even load a
  K_j, V_j whose tiles are all empty); a partial one applies the element mask; a full one ignores it.
  ``causal=True`` skips exactly the tiles of :func:`flashlab.tiles.tile_grid`.
- Grouped-query attention (GQA; MQA when one K/V head): ``k, v`` with ``h_kv`` heads (dim ``-3``) for
  ``h_q = g h_kv`` query heads. The ``g`` query heads of a group are stacked in one tile of ``g B_r``
  rows, so K_j and V_j are read once per group, not once per query head
  (:func:`flashlab.traffic.grouped`).
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

from flashlab import masks
from flashlab.inputs import as_float_array, attention_inputs, causal_offset, check_block
from flashlab.masks import EMPTY, FULL, PARTIAL, BlockMask
from flashlab.memory import hbm, host
from flashlab.tiles import block_range, check_loop_order, n_blocks


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
    mask=None,
    scale=None,
    loop_order="fa2",
    return_lse=False,
    memory=None,
    trace=None,
    workers=1,
):
    """Exact softmax attention computed tile by tile (FlashAttention forward).

    Shapes: ``q (..., N_q, d)``, ``k (..., N_k, d)``, ``v (..., N_k, d_v)``; leading dims broadcast,
    except that ``k, v`` may have fewer heads (dim ``-3``) than ``q`` when ``h_q % h_kv == 0``
    (grouped-query attention: query head ``h`` uses K/V head ``h // (h_q / h_kv)``, as torch's
    ``enable_gqa=True``). Dtypes, ``scale`` (default ``1/sqrt(d)``), bottom-right ``causal`` alignment
    and fully masked rows (output 0, lse ``-inf``) are exactly as in :func:`flashlab.naive_attention`.

    ``mask``: optional function ``mask(q_idx, k_idx) -> bool`` (True = visible), see
    :mod:`flashlab.masks`; with ``causal=True`` both apply.
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
    q, k, v = _group_heads(q, k, v)
    a = attention_inputs(q, k, v, scale)
    block_q, block_k = check_block("block_q", block_q), check_block("block_k", block_k)
    workers = _check_workers(workers, check_loop_order(loop_order), memory, trace)
    run = _fa1 if loop_order == "fa1" else partial(_fa2, workers=workers)
    batch = a.q.shape[:-3]  # (..., group): the group axis is 1 unless K/V heads are shared
    n_q, d_v = a.q.shape[-2], a.v.shape[-1]
    tiles = _tile_classes(n_q, a.k.shape[-2], block_q, block_k, causal, mask)
    # Flat (B, g, N, d): every tile op below is one call over all B problems and the g query heads of
    # a group; K and V keep one copy per group (a broadcast view over g, sliced back to one).
    q4 = a.q.reshape((math.prod(batch),) + a.q.shape[-3:])
    k4, v4 = (x[..., :1, :, :].reshape((math.prod(batch), 1) + x.shape[-2:]) for x in (a.k, a.v))
    out = batch[:-1] + (batch[-1] * a.q.shape[-3],) if batch else ()
    q4, k4, v4 = hbm(memory, "Q", q4), hbm(memory, "K", k4), hbm(memory, "V", v4)  # slices counted
    o, lse = run(q4, k4, v4, a.scale, tiles, memory, trace, out)
    o = o.reshape(out + (n_q, d_v)).astype(a.out_dtype, copy=False)
    return (o, lse.reshape(out + (n_q,))) if return_lse else o


def _tile_classes(n_q, n_k, block_q, block_k, causal, mask) -> BlockMask:
    """The :class:`flashlab.masks.BlockMask` that :func:`flash_attention` walks: ``causal`` (bottom-right)
    and ``mask`` intersected; every tile :data:`flashlab.masks.FULL` when neither is given."""
    parts = ([masks.causal(causal_offset(n_q, n_k))] if causal else []) + ([] if mask is None else [mask])
    if not parts:
        shape = (n_blocks(n_q, block_q), n_blocks(n_k, block_k))
        return BlockMask(np.full(shape, FULL, np.int8), None, n_q, n_k, block_q, block_k)
    return masks.block_mask(
        parts[0] if len(parts) == 1 else masks.intersect(*parts), n_q, n_k, block_q, block_k
    )


def _group_heads(q, k, v):
    """Insert the group axis: ``q (..., h_kv, g, N_q, d)``, ``k, v (..., h_kv, 1, N_k, d)``.

    Grouping applies when ``k`` has fewer heads (dim -3) than ``q``; otherwise ``g = 1``.
    """
    q, k, v = as_float_array("q", q), as_float_array("k", k), as_float_array("v", v)
    if min(q.ndim, k.ndim, v.ndim) < 2:
        attention_inputs(q, k, v)  # raises, naming the argument
    if q.ndim < 3 or k.ndim < 3 or q.shape[-3] <= k.shape[-3]:
        return q[..., None, :, :], k[..., None, :, :], v[..., None, :, :]
    h_q, h_kv = q.shape[-3], k.shape[-3]
    if v.ndim < 3 or v.shape[-3] != h_kv:
        raise ValueError(f"v must have as many heads (dim -3) as k: k has h_kv={h_kv}, v has shape {v.shape}")
    if h_q % h_kv:
        raise ValueError(
            f"q has h_q={h_q} heads (dim -3) and k, v have h_kv={h_kv}: grouped-query attention needs "
            f"h_q to be a multiple of h_kv (each K/V head serves h_q / h_kv query heads); use h_kv in "
            f"{[h for h in range(1, h_q + 1) if h_q % h == 0]}"
        )
    grouped = q.reshape(q.shape[:-3] + (h_kv, h_q // h_kv) + q.shape[-2:])
    return grouped, k[..., None, :, :], v[..., None, :, :]


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


def _record(trace, loop_order, i, j, tiles, batch, m=None, l=None, o=None):  # noqa: E741
    """Append one :class:`TileStep` (``m, l, o`` given for a computed tile, in the flat batch)."""
    rows, cols = block_range(i, tiles.block_q, tiles.n_q), block_range(j, tiles.block_k, tiles.n_k)
    shaped = [None if x is None else x.reshape(batch + x.shape[2:]).copy() for x in (m, l, o)]
    trace.append(TileStep(len(trace), loop_order, i, j, rows, cols, m is None, *shaped))


def _flat(tile: np.ndarray) -> np.ndarray:
    """A ``(B, g, ...)`` tile as ``(B g, ...)``: how :class:`flashlab.memory.MemoryModel` sees it."""
    return tile.reshape((-1,) + tile.shape[2:])


def _safe_max(m: np.ndarray) -> np.ndarray:
    """``m`` with ``-inf`` (a row that has seen no key yet) replaced by 0, so ``exp(x - m)`` is 0, not nan."""
    return np.where(np.isneginf(m), 0.0, m)


def _fa1(q, k, v, scale, tiles, memory, trace, batch):
    """Algorithm 1 of FlashAttention (Dao et al., 2022), line by line, on flat ``(B, g, N, d)`` arrays."""
    n_b, g, n_q, n_k, d_v = q.shape[0], q.shape[1], q.shape[2], k.shape[2], v.shape[3]
    block_q, block_k = tiles.block_q, tiles.block_k
    # Line 2: O = 0, l = 0, m = -inf "in HBM" (not counted as traffic, see the module docstring).
    o = hbm(memory, "O", np.zeros((n_b, g, n_q, d_v), q.dtype))
    l_hbm = hbm(memory, "l", np.zeros((n_b, g, n_q), q.dtype))
    m_hbm = hbm(memory, "m", np.full((n_b, g, n_q), -np.inf, q.dtype))
    t_r, t_c = tiles.classes.shape
    for j in range(t_c):  # line 5
        c0, c1 = block_range(j, block_k, n_k)
        used = bool(np.any(tiles.classes[:, j] != EMPTY))
        # line 6: load K_j, V_j from HBM to SRAM (not at all when every tile of column j is empty)
        k_j, v_j = (k[:, :, c0:c1], v[:, :, c0:c1]) if used else (None, None)
        if memory is not None and used:
            memory.hold("K", _flat(k_j))
            memory.hold("V", _flat(v_j))
        for i in range(t_r):  # line 7
            if tiles.classes[i, j] == EMPTY:  # every entry of tile (i, j) is masked: skip it
                if trace is not None:
                    _record(trace, "fa1", i, j, tiles, batch)
                continue
            r0, r1 = block_range(i, block_q, n_q)
            q_i, o_i = q[:, :, r0:r1], o[:, :, r0:r1]
            l_i, m_i = l_hbm[:, :, r0:r1], m_hbm[:, :, r0:r1]
            if memory is not None:  # line 8: load Q_i, O_i, l_i, m_i from HBM to SRAM
                for name, tile in (("Q", q_i), ("O", o_i), ("l", l_i), ("m", m_i)):
                    memory.hold(name, _flat(tile))
            s = q_i @ np.swapaxes(k_j, -1, -2)  # line 9: S_ij = tau Q_i K_j^T
            s *= scale
            if memory is not None:
                memory.hold("S", _flat(s))
            if tiles.classes[i, j] == PARTIAL:
                np.copyto(s, -np.inf, where=~tiles.tile(i, j))
            # Line 10: m~ = rowmax(S), P~ = exp(S - m~), l~ = rowsum(P~).
            m_t = s.max(axis=-1)
            s -= _safe_max(m_t)[..., None]
            p = np.exp(s, out=s)  # in place: S_ij becomes P~_ij
            if memory is not None:
                memory.free("S")
                memory.hold("P", _flat(p))
            l_t = p.sum(axis=-1)
            # Line 11: m_new = max(m_i, m~), l_new = e^(m_i - m_new) l_i + e^(m~ - m_new) l~.
            m_new = np.maximum(m_i, m_t)
            alpha = np.exp(m_i - _safe_max(m_new))
            beta = np.exp(m_t - _safe_max(m_new))
            l_new = alpha * l_i + beta * l_t
            # Line 12: O_i = diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~ - m_new) P~ V_j).
            num = (alpha * l_i)[..., None] * o_i + beta[..., None] * (p @ v_j)
            o_new = num / np.where(l_new > 0, l_new, 1.0)[..., None]
            o[:, :, r0:r1] = o_new  # lines 12-13: write O_i, l_i, m_i to HBM
            l_hbm[:, :, r0:r1], m_hbm[:, :, r0:r1] = l_new, m_new
            if memory is not None:
                memory.free("Q", "O", "l", "m", "P")
            if trace is not None:
                _record(trace, "fa1", i, j, tiles, batch, m_new, l_new, o_new)
        if memory is not None:
            memory.free("K", "V")
    return host(o), _lse(host(m_hbm), host(l_hbm))


def _fa2(q, k, v, scale, tiles, memory, trace, batch, workers=1):
    """FlashAttention-2 forward (Dao, 2023, Algorithm 1 of that paper) on flat ``(B, g, N, d)`` arrays.

    Outer loop over query blocks ``i`` (:func:`_fa2_query_block` does one). The blocks are
    independent, which is what FlashAttention-2 parallelises on a GPU; here ``workers > 1`` runs
    them on that many threads (NumPy releases the GIL inside its array operations).
    """
    n_b, g, n_q, d_v = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    o = hbm(memory, "O", np.empty((n_b, g, n_q, d_v), q.dtype))
    lse = hbm(memory, "lse", np.empty((n_b, g, n_q), q.dtype))
    query_block = partial(_fa2_query_block, q, k, v, o, lse, scale, tiles, memory, trace, batch)
    t_r = tiles.classes.shape[0]
    if workers == 1:
        for i in range(t_r):
            query_block(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(query_block, range(t_r)):  # re-raises a worker's exception
                pass
    return host(o), host(lse)


def _fa2_query_block(q, k, v, o, lse, scale, tiles, memory, trace, batch, i):
    """FA2 for query block ``i``: fills ``o[:, :, rows(i)]`` and ``lse[:, :, rows(i)]``.

    ``Q_i`` (the ``g`` heads of a group together) is loaded once; the unnormalised accumulator
    ``acc = O_i``, running max ``m_i`` and sum ``l_i`` stay on chip. Inner loop over the non-empty key
    blocks ``j``: ``S = tau Q_i K_j^T``, ``m_new = max(m_i, rowmax S)``, ``P = exp(S - m_new)``,
    ``l_i = e^(m_i - m_new) l_i + rowsum P``, ``acc = e^(m_i - m_new) acc + P V_j``. After the inner
    loop, ``O_i = acc / l_i`` and ``lse_i = m_i + log l_i`` are written once.

    Speed: the score tile lives in one buffer and is turned into ``P`` in place; the softmax scale
    is folded into ``Q_i`` once per query block.
    """
    n_b, g, n_q, n_k, d_v = q.shape[0], q.shape[1], q.shape[2], k.shape[2], v.shape[3]
    r0, r1 = block_range(i, tiles.block_q, n_q)
    rows = r1 - r0
    classes = tiles.classes[i]
    live = bool(np.any(classes != EMPTY))
    if live:
        q_i = q[:, :, r0:r1]
        if memory is not None:  # load Q_i from HBM to SRAM
            memory.hold("Q", _flat(q_i))
        q_i = q_i * scale
        acc = np.zeros((n_b, g, rows, d_v), q.dtype)
        m_i = np.full((n_b, g, rows), -np.inf, q.dtype)
        l_i = np.zeros((n_b, g, rows), q.dtype)
        if memory is not None:  # on chip: O_i accumulator, m_i, l_i
            memory.hold("O", _flat(acc))
            memory.hold("m", _flat(m_i))
            memory.hold("l", _flat(l_i))
        s_buf = np.empty(n_b * g * rows * min(tiles.block_k, n_k), q.dtype)
        pv = np.empty((n_b, g, rows, d_v), q.dtype)
    for j, cls in enumerate(classes):
        if cls == EMPTY:  # every entry masked: K_j, V_j are not loaded, nothing is computed
            if trace is not None:
                _record(trace, "fa2", i, j, tiles, batch)
            continue
        c0, c1 = block_range(j, tiles.block_k, n_k)
        k_j, v_j = k[:, :, c0:c1], v[:, :, c0:c1]
        if memory is not None:  # load K_j, V_j from HBM to SRAM
            memory.hold("K", _flat(k_j))
            memory.hold("V", _flat(v_j))
        s = s_buf[: n_b * g * rows * (c1 - c0)].reshape(n_b, g, rows, c1 - c0)
        np.matmul(q_i, np.swapaxes(k_j, -1, -2), out=s)  # S_ij = tau Q_i K_j^T
        if memory is not None:
            memory.hold("S", _flat(s))
        if cls == PARTIAL:
            np.copyto(s, -np.inf, where=~tiles.tile(i, j))
        m_new = np.maximum(m_i, s.max(axis=-1))
        # A row masked so far keeps m = -inf: exp needs a safe max (only after a partial tile).
        m_use = _safe_max(m_new) if cls == PARTIAL else m_new
        s -= m_use[..., None]
        p = np.exp(s, out=s)  # P_ij = exp(S_ij - m_new), in place
        if memory is not None:
            memory.free("S")
            memory.hold("P", _flat(p))
        alpha = np.exp(m_i - m_use)  # rescales what was accumulated so far (0 at the first tile)
        l_i *= alpha
        l_i += p.sum(axis=-1)
        acc *= alpha[..., None]
        acc += np.matmul(p, v_j, out=pv)
        m_i = m_new
        if memory is not None:
            memory.free("K", "V", "P")
        if trace is not None:
            _record(trace, "fa2", i, j, tiles, batch, m_i, l_i, _normalise(acc, l_i))
    if live:  # O_i = diag(l_i)^-1 acc, lse_i = m_i + log l_i
        o[:, :, r0:r1] = _normalise(acc, l_i)
        lse[:, :, r0:r1] = _lse(m_i, l_i)
    else:  # this query block sees no key; nothing to load or compute
        o[:, :, r0:r1] = 0.0
        lse[:, :, r0:r1] = -np.inf
    if memory is not None:  # write O_i and lse_i to HBM, once
        memory.free("Q", "O", "m", "l")


def _normalise(acc: np.ndarray, l: np.ndarray) -> np.ndarray:  # noqa: E741
    """``acc / l`` row-wise, with 0 where ``l = 0`` (a row that has seen no key)."""
    return acc / np.where(l > 0, l, 1.0)[..., None]


def _lse(m: np.ndarray, l: np.ndarray) -> np.ndarray:  # noqa: E741
    """``lse = m + log l``, ``-inf`` where ``l = 0`` (a row that saw no key)."""
    with np.errstate(divide="ignore"):
        return np.where(l > 0, m + np.log(l), -np.inf)
