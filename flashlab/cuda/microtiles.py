"""The micro-tile steps that the forward and backward kernels share: one source for each.

A thread block keeps its tiles in one dynamic shared-memory array ``smem`` (floats, indexed by
``index``: ``uint64`` by default, so that numba skips the negative-index wrap-around test it emits
for signed indices; ``int64`` only to measure what that test costs). A thread of
row group ``rg`` and column group ``cg`` owns a ``tm x tn`` micro-tile in registers: rows
``rg + R*a`` (a < tm) and columns ``cg + G*b`` (b < tn). Three steps recur:

- :func:`stage`: copy rows of two global tensors into two shared tiles, ``LC`` adjacent columns
  per step, every load of a step issued before its stores (they wait for memory together);
- :func:`product`: a micro-tile of ``L X^T`` from two row-major shared tiles (S = Q K^T in the
  forward; S^T = K Q^T and dP^T = V dO^T in the backward), ``unroll`` adjacent values of each row
  read by one 8- or 16-byte load, each feeding ``tn`` (or ``tm``) multiply-adds;
- :func:`accumulate`: ``acc += L X`` for a row-major ``L`` (P, P^T, dS^T) and a row-major ``X``
  (V, dO, Q), the thread's ``d/g`` head columns ``col(b)`` in runs of ``w = min(4, d/g)``.

Each factory closes over the compile-time sizes (so numba unrolls the loops and keeps the local
arrays in registers) and returns a plain Python function. The kernel factories pass it through
``device``: ``cuda.jit(device=True)`` on a GPU, unchanged in the simulator and the traffic counter,
like the forward's ``key_step``. The helpers never touch ``cuda.*``: the caller owns the scratch
register arrays (``cuda.local.array``) and passes them in.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import uint64

ZERO = np.float32(0.0)


@cache
def stage(rows: int, d: int, lc: int, threads: int, index=uint64):
    """``stage(smem, dst_a, stride_a, dst_b, stride_b, src_a, src_b, bh, row0, n, mul_a, ra, rb, tid)``:
    rows ``row0 .. row0 + rows - 1`` of ``src_a[bh]`` (times ``mul_a``) and ``src_b[bh]`` to shared
    memory at ``dst_a``, ``dst_b`` (row strides ``stride_a``, ``stride_b``); rows at or past ``n`` as
    zeros. ``ra, rb``: the caller's ``lc``-float register scratch."""
    ROWS, D, LC, T, IDX = rows, d, lc, threads, index
    STEPS = D // LC

    def stage_rows(smem, dst_a, stride_a, dst_b, stride_b, src_a, src_b, bh, row0, n, mul_a, ra, rb, tid):
        for e in range(tid, ROWS * STEPS, T):
            r = e // STEPS
            c = e % STEPS * LC
            if row0 + r < n:
                for u in range(LC):  # all loads first: they wait for memory together
                    ra[u] = src_a[bh, row0 + r, c + u] * mul_a
                    rb[u] = src_b[bh, row0 + r, c + u]
            else:
                for u in range(LC):
                    ra[u] = ZERO
                    rb[u] = ZERO
            for u in range(LC):
                smem[IDX(dst_a + r * stride_a + c + u)] = ra[u]
                smem[IDX(dst_b + r * stride_b + c + u)] = rb[u]

    return stage_rows


@cache
def product(tm: int, tn: int, row_groups: int, g: int, d: int, unroll: int, index=uint64):
    """``product(smem, out, lf, xf, left, left_stride, right, right_stride, rg, cg)``:
    ``out[a, b] = sum_c L[rg + R*a, c] * X[cg + G*b, c]``, a ``tm x tn`` micro-tile of ``L X^T``
    for row-major shared tiles ``L`` at ``left`` and ``X`` at ``right`` (``d`` columns each).
    ``lf (tm, unroll)``, ``xf (tn, unroll)``: register scratch."""
    TM, TN, R, G, D, UN, IDX = tm, tn, row_groups, g, d, unroll, index

    def micro_product(smem, out, lf, xf, left, left_stride, right, right_stride, rg, cg):
        for a in range(TM):
            for b in range(TN):
                out[a, b] = ZERO
        for c0 in range(0, D, UN):
            for a in range(TM):
                for u in range(UN):
                    lf[a, u] = smem[IDX(left + (rg + R * a) * left_stride + c0 + u)]
            for b in range(TN):
                for u in range(UN):
                    xf[b, u] = smem[IDX(right + (cg + G * b) * right_stride + c0 + u)]
            for u in range(UN):
                for a in range(TM):
                    for b in range(TN):
                        out[a, b] += lf[a, u] * xf[b, u]

    return micro_product


@cache
def accumulate(tm: int, td: int, row_groups: int, g: int, inner: int, unroll: int, index=uint64):
    """``accumulate(smem, acc, lf, xf, left, left_stride, right, right_stride, rg, cg)``:
    ``acc[a, b] += sum_r L[rg + R*a, r] * X[r, col(b)]`` over ``inner`` values of ``r``, for row-major
    shared tiles ``L`` at ``left`` and ``X`` at ``right``; ``col(b) = b // w * w * g + cg * w + b % w``.
    ``lf (tm, unroll)``, ``xf (unroll, td)``: register scratch."""
    TM, TD, R, G, K, UN, IDX = tm, td, row_groups, g, inner, unroll, index
    W = min(4, TD)

    def micro_accumulate(smem, acc, lf, xf, left, left_stride, right, right_stride, rg, cg):
        for r0 in range(0, K, UN):
            for a in range(TM):
                for u in range(UN):
                    lf[a, u] = smem[IDX(left + (rg + R * a) * left_stride + r0 + u)]
            for u in range(UN):
                for b in range(TD):
                    xf[u, b] = smem[IDX(right + (r0 + u) * right_stride + b // W * W * G + cg * W + b % W)]
            for u in range(UN):
                for a in range(TM):
                    for b in range(TD):
                        acc[a, b] += lf[a, u] * xf[u, b]

    return micro_accumulate
