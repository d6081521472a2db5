"""numba.cuda kernels of the FlashAttention backward pass (float32; launched by :mod:`flashlab.cuda.launch`).

Two kernels, as in FlashAttention-2:

1. :func:`preprocess_kernel`, one thread per query row: ``D_i = rowsum(dO_i * O_i)`` (the pre-pass of
   :func:`flashlab.backward.row_dot`) and ``dQ_i = 0`` (Algorithm 4, line 5).
2. :func:`backward_source` (one compiled kernel per head dim ``d``, tiles and causal flag): **one thread
   block per K/V block** ``j`` of ``B_c`` keys. The grid is the outer loop of Algorithm 4 (line 6);
   each block walks the Q blocks (line 9) and keeps ``dK_j, dV_j`` on chip (line 8), in registers,
   written once at the end (line 24).

**Register micro-tiles** (the forward's fast kernel, :func:`flashlab.cuda.forward.register_tiled_source`,
taught the lessons used here). The block has ``(B_c / tk) * g`` threads; thread
``(kg, cg) = divmod(tid, g)`` owns

- keys ``kg + R*a`` (``a < tk``, ``R = B_c / tk``) by Q-tile rows ``cg + g*b`` (``b < tn``, ``B_r = g*tn``)
  of ``S, P, dP, dS``, in registers;
- the same keys by head columns ``col(b)`` (``b < d/g``: runs of ``w = min(4, d/g)`` adjacent columns,
  ``cg*w + (b % w)`` in each stretch of ``w*g``) of ``dK_j`` and ``dV_j``, in registers, for the
  whole kernel: no thread shares a dK or dV element, so they are written straight from registers;
- for the dQ step, Q-tile rows ``qr*tq + a`` by head columns ``qc + q_c*c`` of ``dS K_j``, where
  ``(qr, qc) = divmod(tid, q_c)`` and ``q_c = min(32, d)``: the lanes of a warp take adjacent columns
  of the same rows.

Every value a thread reads from shared memory feeds several multiply-adds (``tk`` or ``tn`` of them in
``S`` and ``dP``, ``tk`` or ``d/g`` in ``dK`` and ``dV``), and ``unroll`` adjacent floats are read by
one 8- or 16-byte load. Per Q tile (lines 10-22 of Algorithm 4, with FlashAttention-2's ``lse``, ``D``):

1. stage ``Q_i`` (times ``scale * log2 e``, so that ``exp2`` is the exponential, as in the forward),
   ``dO_i``, ``lse_i * log2 e`` and ``D_i`` in shared memory (line 10);
2. ``S^T = K_j Q_i^T`` and ``dP^T = V_j dO_i^T`` for the thread's micro-tile (lines 11 and 17), then
   ``P = exp2(S - lse)`` (line 13; masked only in tiles that cross the diagonal or an end) and
   ``dS = P (dP - D)`` (line 20); ``P`` and ``dS`` go to shared memory, key-major (``P^T``, ``dS^T``);
3. ``dV_j += P^T dO_i`` and ``dK_j += dS^T Q_i`` (lines 16 and 22) into the thread's registers, and
   ``dQ_i += scale dS K_j`` (line 21) by atomic adds.

Three barriers per Q tile. Shared memory (one dynamic array, :func:`backward_layout`) holds ``K_j, V_j``
for the whole kernel and ``Q_i, dO_i, P^T, dS^T`` of one tile: more than the 48 KiB a kernel may
declare statically, so the launcher opts in to more (see :mod:`flashlab.cuda._numba`). The staging,
``S^T``/``dP^T`` and ``dV``/``dK`` steps are the forward's micro-tile helpers
(:mod:`flashlab.cuda.microtiles`), with the roles of rows and keys swapped.
Shared-memory indices are unsigned (``uint64``): numba then skips the negative-index wrap-around test.

**dQ by atomic adds.** ``dQ_i = sum_j scale dS_ij K_j`` sums over *all* K/V blocks, i.e. over thread
blocks that run at the same time. Two ways to get it:

- atomic adds (chosen, as FlashAttention-2 does): each thread block adds its ``B_r x d`` partial
  ``scale dS_ij K_j`` to dQ in global memory, one ``atomicAdd`` per element per tile: ``T_c N_q d``
  atomics in all, the read-modify-write of Algorithm 4's line 21 done by the memory system. The
  threads of a warp add to adjacent floats of one row (for ``d >= 32``: one 128-byte line per warp
  instruction);
- a separate pass over Q blocks recomputing ``S`` and ``dP`` (two more ``B_r x B_c x d`` matmuls per tile,
  seven instead of five: 40% more FLOPs) that accumulates dQ on chip and writes it once.

The atomics cost no extra FLOPs and keep one kernel. Their price: float addition is not associative
and the order in which blocks add is not fixed, so dQ can differ between two runs by rounding (in its
last bits); dK and dV are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

from numba import cuda, float32, uint64

from flashlab.cuda import microtiles
from flashlab.cuda.forward import LN2, LOAD_COLUMNS, LOG2E, ZERO
from flashlab.cuda.spec import KernelSpec, check_divides, python_function

# Tiles per head dim: B_c = keys (per thread block) = tk * R, B_r = rows (per Q tile) = g * tn;
# blocks: thread blocks an SM should hold at once (the compiler keeps registers to what that allows;
# at d = 128 the shared memory of one block leaves no room for a second).
BACKWARD_TILES = {
    16: {"keys": 64, "rows": 64, "tk": 4, "tn": 4, "g": 16, "unroll": 4, "blocks": 2},
    32: {"keys": 64, "rows": 64, "tk": 4, "tn": 4, "g": 16, "unroll": 4, "blocks": 2},
    64: {"keys": 64, "rows": 64, "tk": 4, "tn": 4, "g": 16, "unroll": 4, "blocks": 2},
    128: {"keys": 64, "rows": 32, "tk": 4, "tn": 2, "g": 16, "unroll": 4, "blocks": 1},
}
PREPROCESS_THREADS = 128
PARAMS = ("q", "k", "v", "do", "lse", "delta", "dq", "dk", "dv", "scale", "offset")
SIGNATURE = (
    "void(float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], "
    "float32[:, ::1], float32[:, ::1], float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], "
    "float32, int64)"
)
PREPROCESS_PARAMS = ("o", "do", "delta", "dq")
PREPROCESS_SIGNATURE = "void(float32[:, :, ::1], float32[:, :, ::1], float32[:, ::1], float32[:, :, ::1])"


class BackwardLayout(NamedTuple):
    """Where each tile of :func:`backward_source` sits in its dynamic shared memory (offsets in floats).

    ``K_j[j, c]``, ``V_j[j, c]``, ``Q_i[r, c]``, ``dO_i[r, c]``: row stride ``d + 4``; ``P^T[j, r]``,
    ``dS^T[j, r]``: row stride ``B_r + g``; then ``lse_i`` and ``D_i`` (``B_r`` floats each). Every row
    starts on a 16-byte boundary (one load can read 4 adjacent floats); the paddings put the rows that
    one warp reads or writes at the same time on different banks (for ``P^T``, ``dS^T``: with ``tn`` even,
    consecutive keys start ``g`` banks apart).
    """

    k: int
    v: int
    q: int
    do: int
    p: int
    ds: int
    lse: int
    delta: int
    floats: int
    stride: int
    p_stride: int


def backward_layout(d: int, keys: int, rows: int, g: int) -> BackwardLayout:
    stride, p_stride = d + 4, rows + g
    k, v = 0, keys * stride
    q = 2 * keys * stride
    do = q + rows * stride
    p = do + rows * stride
    ds = p + keys * p_stride
    lse = ds + keys * p_stride
    return BackwardLayout(k, v, q, do, p, ds, lse, lse + rows, lse + 2 * rows, stride, p_stride)


def preprocess(o, do, delta, dq):
    """``delta[b, i] = sum_c dO[b, i, c] O[b, i, c]`` and ``dq[b, i, :] = 0``; grid ``(ceil(N_q / T), B)``.

    Shapes: ``o, do (B, N_q, d_v)``, ``delta (B, N_q)``, ``dq (B, N_q, d)``, float32.
    """
    i = cuda.grid(1)
    b = cuda.blockIdx.y
    if i < o.shape[1]:
        acc = float32(0)
        for c in range(o.shape[2]):
            acc += do[b, i, c] * o[b, i, c]
        delta[b, i] = acc
        for c in range(dq.shape[2]):
            dq[b, i, c] = 0


def _preprocess_grid(args) -> tuple:
    return (math.ceil(args["o"].shape[1] / PREPROCESS_THREADS), args["o"].shape[0])


def preprocess_spec(d: int, target: str) -> KernelSpec:
    """The pre-pass's spec: one thread per query row, :data:`PREPROCESS_THREADS` per block."""
    return KernelSpec(
        "backward_preprocess", d, False, preprocess, PREPROCESS_PARAMS, _preprocess_grid,
        (PREPROCESS_THREADS,), 0, PREPROCESS_SIGNATURE, (), target,
    )  # fmt: skip


@cache
def backward_source(
    d: int,
    causal: bool,
    keys: int,
    rows: int,
    tk: int,
    tn: int,
    g: int,
    unroll: int,
    device: Callable = python_function,
):
    """The backward kernel's source for head dim ``d`` and the given tiles (compile-time constants).

    Launch: grid ``(ceil(N_k / keys), B)``, ``(keys / tk) * g`` threads, ``backward_layout(...).floats``
    floats of dynamic shared memory (:func:`backward_spec` says both). Arguments: ``q, do, dq (B, N_q, d)``;
    ``k, v, dk, dv (B, N_k, d)``; ``lse, delta (B, N_q)``, all float32; ``scale`` (float32),
    ``offset = N_k - N_q`` (bottom-right causal: query i sees key j iff ``j <= i + offset``).
    ``dq`` must hold zeros (:func:`preprocess`).
    """
    D, BC, BR, TK, TN, G, UN = d, keys, rows, tk, tn, g, unroll
    R = BC // TK  # key groups
    T = R * G  # threads per block
    TD = D // G  # dK, dV columns per thread
    W = min(4, TD)  # dK, dV columns a thread owns side by side
    QC = min(32, D)  # dQ step: QC threads (a warp) per row group, thread qc adds to columns qc + QC*c
    TQD = D // QC  # dQ columns per thread
    TQ = BR * QC // T  # dQ rows per thread
    LC, CAUSAL = min(LOAD_COLUMNS, D), causal
    KB, VB, QB, OB, PB, SB, LB, DB, _, ST, PS = backward_layout(D, BC, BR, G)  # offsets, strides
    stage_keys = device(microtiles.stage(BC, D, LC, T))
    stage_rows = device(microtiles.stage(BR, D, LC, T))
    product = device(microtiles.product(TK, TN, R, G, D, UN))
    accumulate = device(microtiles.accumulate(TK, TD, R, G, BR, UN))

    def backward(q, k, v, do, lse, delta, dq, dk, dv, scale, offset):
        smem = cuda.shared.array(0, float32)
        s = cuda.local.array((TK, TN), float32)
        dp = cuda.local.array((TK, TN), float32)
        dk_acc = cuda.local.array((TK, TD), float32)
        dv_acc = cuda.local.array((TK, TD), float32)
        dq_acc = cuda.local.array((TQ, TQD), float32)
        dsf = cuda.local.array(TQ, float32)
        kf = cuda.local.array(TQD, float32)
        lf = cuda.local.array((TK, UN), float32)
        xf = cuda.local.array((TN, UN), float32)
        yf = cuda.local.array((UN, TD), float32)
        ra = cuda.local.array(LC, float32)
        rb = cuda.local.array(LC, float32)
        b = cuda.blockIdx.y
        j0 = cuda.blockIdx.x * BC
        tid = cuda.threadIdx.x
        kg = tid // G
        cg = tid % G
        qr = tid // QC
        qc = tid % QC
        n_q, n_k = q.shape[1], k.shape[1]
        scale2 = scale * LOG2E

        stage_keys(smem, KB, ST, VB, ST, k, v, b, j0, n_k, float32(1), ra, rb, tid)  # line 7: K_j, V_j
        for a in range(TK):  # line 8: dK_j = dV_j = 0, in registers
            for c in range(TD):
                dk_acc[a, c] = ZERO
                dv_acc[a, c] = ZERO
        first_row = 0
        if CAUSAL:  # Q blocks above the diagonal see none of these keys: skipped
            first_row = max(0, j0 - offset) // BR * BR
        for i0 in range(first_row, n_q, BR):  # line 9
            # Line 10: load Q_i (pre-scaled), dO_i, lse_i (base 2), D_i. dQ_i is updated by atomics.
            stage_rows(smem, QB, ST, OB, ST, q, do, b, i0, n_q, scale2, ra, rb, tid)
            for r in range(tid, BR, T):
                inside = i0 + r < n_q
                smem[uint64(LB + r)] = lse[b, i0 + r] * LOG2E if inside else ZERO
                smem[uint64(DB + r)] = delta[b, i0 + r] if inside else ZERO
            cuda.syncthreads()
            product(smem, s, lf, xf, KB, ST, QB, ST, kg, cg)  # line 11: S^T = K_j Q_i^T (scaled, base 2)
            product(smem, dp, lf, xf, VB, ST, OB, ST, kg, cg)  # line 17: dP^T = V_j dO_i^T
            edge = j0 + BC > n_k or i0 + BR > n_q or (CAUSAL and j0 + BC - 1 > i0 + offset)
            for a in range(TK):
                j = j0 + kg + R * a
                for t in range(TN):
                    r = cg + G * t
                    p = math.exp2(s[a, t] - smem[uint64(LB + r)])  # line 13: P from lse
                    if edge and (j >= n_k or i0 + r >= n_q or (CAUSAL and j > i0 + r + offset)):
                        p = ZERO  # line 12: masked (and padding rows and keys)
                    smem[uint64(PB + (kg + R * a) * PS + r)] = p
                    smem[uint64(SB + (kg + R * a) * PS + r)] = p * (dp[a, t] - smem[uint64(DB + r)])
            cuda.syncthreads()  # line 20 done: dS = P (dP - D), all of it in shared memory
            accumulate(smem, dv_acc, lf, yf, PB, PS, OB, ST, kg, cg)  # line 16: dV_j += P^T dO_i
            accumulate(smem, dk_acc, lf, yf, SB, PS, QB, ST, kg, cg)  # line 22: dK_j += dS^T Q_i
            # Line 21: dQ_i += scale dS K_j: the thread's TQ x TQD elements, one atomic add each.
            for a in range(TQ):
                for c in range(TQD):
                    dq_acc[a, c] = ZERO
            for jj in range(BC):
                for a in range(TQ):
                    dsf[a] = smem[uint64(SB + jj * PS + qr * TQ + a)]
                for c in range(TQD):
                    kf[c] = smem[uint64(KB + jj * ST + qc + QC * c)]
                for a in range(TQ):
                    for c in range(TQD):
                        dq_acc[a, c] += dsf[a] * kf[c]
            for a in range(TQ):
                i = i0 + qr * TQ + a
                if i < n_q:
                    for c in range(TQD):
                        cuda.atomic.add(dq, (b, i, qc + QC * c), scale * dq_acc[a, c])
            cuda.syncthreads()  # the next tile may overwrite Q_i, dO_i, P^T, dS^T
        # Line 24: write dK_j, dV_j from registers. Q was scaled by scale * log2(e), so dS^T Q_i is
        # dK_j times log2(e): multiplying by ln 2 gives dK_j = scale dS^T Q_i.
        for a in range(TK):
            j = j0 + kg + R * a
            if j < n_k:
                for c in range(TD):
                    col = c // W * W * G + cg * W + c % W
                    dk[b, j, col] = dk_acc[a, c] * LN2
                    dv[b, j, col] = dv_acc[a, c]

    return backward


def key_grid(keys: int):
    """The backward grid: thread block ``(x, y)`` owns keys ``x*keys ...`` of head ``y``."""

    def grid(args) -> tuple:
        return (math.ceil(args["k"].shape[1] / keys), args["q"].shape[0])

    return grid


def backward_spec(d: int, causal: bool, t: dict, device: Callable, target: str) -> KernelSpec:
    """The backward kernel's spec; tiles ``keys`` (B_c per thread block) = tk * R, ``rows`` (B_r per Q
    tile) = g * tn, ``unroll`` dividing d and rows, ``blocks``: thread blocks per SM the compiler keeps
    registers for (launch bounds). Threads ``T = (keys / tk) * g``; the dQ step needs ``min(32, d)``
    to divide T and T / min(32, d) to divide rows."""
    keys, rows, tk, tn, g, unroll = (t[x] for x in ("keys", "rows", "tk", "tn", "g", "unroll"))
    check_divides("backward", keys, "keys", tk, "tk")
    check_divides("backward", d, "d", g, "g")
    check_divides("backward", d, "d", unroll, "unroll")
    check_divides("backward", rows, "rows", unroll, "unroll")
    if rows != g * tn:
        raise ValueError(f"backward: rows={rows} must equal g*tn={g * tn}")
    threads = keys // tk * g
    if threads > 1024:
        raise ValueError(f"backward: (keys/tk)*g = {threads} threads > 1024 per block")
    qc = min(32, d)
    if threads % qc or rows % (threads // qc):
        raise ValueError(
            f"backward: the dQ step needs min(32, d)={qc} to divide the {threads} threads "
            f"((keys/tk)*g) and {threads}/{qc} to divide rows={rows}"
        )
    src = backward_source(d, causal, keys, rows, tk, tn, g, unroll, device)
    shared = 4 * backward_layout(d, keys, rows, g).floats
    return KernelSpec(
        "backward", d, causal, src, PARAMS, key_grid(keys), (threads,), shared, SIGNATURE,
        tuple(t.items()), target, (threads, t["blocks"]),
    )  # fmt: skip
