"""The tile schedule: which ``B_r x B_c`` tiles of the ``N_q x N_k`` score matrix are computed.

Every blocked implementation in the course (NumPy in :mod:`flashlab.flash`, the traffic closed
forms, the GPU kernels, the explorers) splits the rows (queries) into ``T_r = ceil(N_q / B_r)``
blocks and the columns (keys) into ``T_c = ceil(N_k / B_c)`` blocks; the last block of each may be
short. Tile ``(i, j)`` covers query rows ``rows(i)`` and key columns ``cols(j)``.

With ``causal=True`` (bottom-right aligned, as in :func:`flashlab.inputs.causal_mask`: query ``r``
sees key ``c`` iff ``c <= r + N_k - N_q``) a tile is **skipped** (neither loaded nor computed) when
every entry in it is masked, i.e. its first column lies right of the diagonal at its last row.
Tiles that the diagonal crosses are computed with a mask; the others need none. In each row block
the computed tiles are ``j = 0 .. last_col_block(i)`` (none when ``last_col_block(i) < 0``).
"""

from __future__ import annotations

import numpy as np

from flashlab.inputs import causal_offset, check_block


def n_blocks(n: int, block: int) -> int:
    """Number of blocks of size ``block`` covering ``n`` items: ``ceil(n / block)`` (T_r or T_c)."""
    return -(-n // block)


def block_range(index: int, block: int, n: int) -> tuple[int, int]:
    """``(start, stop)`` of block ``index``: ``[index * block, min((index + 1) * block, n))``."""
    start = index * block
    return start, min(start + block, n)


def last_col_block(i: int, n_q: int, n_k: int, block_q: int, block_k: int, causal: bool) -> int:
    """Index of the last key block that row block ``i`` computes (``-1``: the block sees no key).

    Non-causal: ``T_c - 1``. Causal: the block holding key ``r_last + N_k - N_q`` of the block's
    last row ``r_last``, clipped to ``[-1, T_c - 1]``.
    """
    t_c = n_blocks(n_k, block_k)
    if not causal:
        return t_c - 1
    last_key = block_range(i, block_q, n_q)[1] - 1 + causal_offset(n_q, n_k)
    return min(t_c - 1, last_key // block_k) if last_key >= 0 else -1


def first_row_block(j: int, n_q: int, n_k: int, block_q: int, block_k: int, causal: bool) -> int:
    """Index of the first query block that key block ``j`` is computed with (non-causal: 0).

    Causal: the first row ``r`` with ``r + N_k - N_q >= j * B_c``, in blocks. Always ``<= T_r - 1``
    for ``N_q >= 1`` (the last query sees every key), so every key block is used at least once.
    """
    if not causal:
        return 0
    first_row = max(0, j * block_k - causal_offset(n_q, n_k))
    return first_row // block_q


def tile_grid(n_q: int, n_k: int, block_q: int, block_k: int, causal: bool = False) -> np.ndarray:
    """Boolean ``(T_r, T_c)`` array: True where tile ``(i, j)`` is computed, False where skipped."""
    block_q, block_k = check_block("block_q", block_q), check_block("block_k", block_k)
    t_r, t_c = n_blocks(n_q, block_q), n_blocks(n_k, block_k)
    last = np.array([last_col_block(i, n_q, n_k, block_q, block_k, causal) for i in range(t_r)], dtype=int)
    return np.arange(t_c)[None, :] <= last[:, None]


def tile_needs_mask(i: int, j: int, n_q: int, n_k: int, block_q: int, block_k: int) -> bool:
    """Causal only: does the diagonal cross computed tile ``(i, j)`` (some entry masked)?

    True iff the tile's last column lies right of the diagonal at its first row.
    """
    first_row = i * block_q
    last_col = block_range(j, block_k, n_k)[1] - 1
    return last_col > first_row + causal_offset(n_q, n_k)


def tile_mask(rows: tuple[int, int], cols: tuple[int, int], n_q: int, n_k: int) -> np.ndarray:
    """Boolean ``(rows, cols)`` array, True where the entry is **masked** (key after the query)."""
    r = np.arange(*rows)[:, None] + causal_offset(n_q, n_k)
    return np.arange(*cols)[None, :] > r


def tile_counts(n_q: int, n_k: int, block_q: int, block_k: int, causal: bool = False) -> tuple[int, int]:
    """``(computed, skipped)`` numbers of tiles; they sum to ``T_r * T_c``."""
    grid = tile_grid(n_q, n_k, block_q, block_k, causal)
    computed = int(grid.sum())
    return computed, grid.size - computed


def visit_order(
    n_q: int, n_k: int, block_q: int, block_k: int, causal: bool = False, loop_order: str = "fa2"
) -> list[tuple[int, int]]:
    """Every tile ``(i, j)`` in the order the loops reach it, skipped ones included.

    ``"fa1"`` (Algorithm 1 of FlashAttention): outer over key blocks ``j``, inner over query blocks
    ``i``. ``"fa2"`` (FlashAttention-2): outer over ``i``, inner over ``j``. Look a tile up in
    :func:`tile_grid` to know whether it is computed.
    """
    t_r, t_c = n_blocks(n_q, block_q), n_blocks(n_k, block_k)
    if check_loop_order(loop_order) == "fa1":
        return [(i, j) for j in range(t_c) for i in range(t_r)]
    return [(i, j) for i in range(t_r) for j in range(t_c)]


LOOP_ORDERS = ("fa1", "fa2")


def check_loop_order(loop_order) -> str:
    """``"fa1"`` or ``"fa2"``, else ``ValueError`` naming the value and the choices."""
    if loop_order not in LOOP_ORDERS:
        raise ValueError(f"loop_order must be one of {', '.join(map(repr, LOOP_ORDERS))}, got {loop_order!r}")
    return loop_order


def coverage(trace, n_q: int, n_k: int) -> np.ndarray:
    """How many times each ``(query, key)`` score was computed, read off a ``flash_attention`` trace.

    ``trace``: the :class:`flashlab.flash.TileStep` list of one run; skipped tiles add nothing.
    Returns an ``(n_q, n_k)`` int array: all ones for a full run, the causal mask's tiles for a causal one.
    """
    seen = np.zeros((n_q, n_k), int)
    for step in trace:
        if not step.skipped:
            seen[slice(*step.rows), slice(*step.cols)] += 1
    return seen
