"""numba.cuda kernels of the FlashAttention backward pass (float32; launched by :mod:`flashlab.gpu_backward`).

Two kernels, as in FlashAttention-2:

1. :func:`preprocess_kernel`, one thread per query row: ``D_i = rowsum(dO_i * O_i)`` (the pre-pass of
   :func:`flashlab.backward.row_dot`) and ``dQ_i = 0`` (Algorithm 4, line 5).
2. :func:`backward_kernel` (one compiled kernel per head dim ``d``): **one thread block per K/V block**
   ``j`` of ``BLOCK_K`` keys. The grid is the outer loop of Algorithm 4 (line 6); each block walks
   the Q blocks (line 9) and keeps ``dK_j, dV_j`` on chip (line 8), written once at the end (line 24).
   The block has ``WARPS`` warps of ``BLOCK_K`` threads: thread ``(t, w)`` owns key ``t`` and the
   query rows ``w, w + WARPS, ...`` of each Q tile, and accumulates its share of that key's
   ``dK_j, dV_j`` rows in local memory; at the end the warps' shares are summed in shared memory.
   (One warp per block would do, but shared memory then caps an SM at a handful of warps, too few to
   hide memory latency.)

**dQ by atomic adds.** ``dQ_i = sum_j scale dS_ij K_j`` sums over *all* K/V blocks, i.e. over thread
blocks that run at the same time. Two ways to get it:

- atomic adds (chosen, as FlashAttention-2 does): each thread block adds its ``B_r x d`` partial
  ``scale dS_ij K_j`` to dQ in global memory, one ``atomicAdd`` per element per tile: ``T_c N_q d``
  atomics in all, the read-modify-write of Algorithm 4's line 21 done by the memory system;
- a separate pass over Q blocks recomputing ``S`` and ``dP`` (two more ``B_r x B_c x d`` matmuls per tile,
  seven instead of five: 40% more FLOPs) that accumulates dQ on chip and writes it once.

The atomics cost no extra FLOPs and keep one kernel. Their price: float addition is not associative
and the order in which blocks add is not fixed, so dQ can differ between two runs by rounding (in its
last bits); dK and dV are deterministic.

Per tile ``(i, j)`` (lines 10-22 of Algorithm 4, with FlashAttention-2's ``lse`` and ``D``):
Q_i and dO_i (``B_r x d``), ``lse_i`` and ``D_i`` are staged in shared memory; for each of its rows
``r``, thread ``(t, w)`` computes ``S[r, t]`` and ``dP[r, t]`` against its key ``K_j[t]``, ``V_j[t]``
(held in shared memory, rows padded by one float so that 32 threads reading 32 different rows hit 32
different banks), then ``P = exp(S - lse)``, ``dS = P * (dP - D)``, adds ``P[r, t] dO_i[r]`` to its
``dV_j[t]`` and ``dS[r, t] Q_i[r]`` to its ``dK_j[t]``, and stores ``dS[r, t]`` in shared memory;
after a barrier the block computes ``dS K_j`` (``B_r x d``) cooperatively and adds it into dQ.

Shared memory is ``4 (2 B_c (d + 1) + 2 B_r d + B_r B_c + 2 B_r)`` bytes; ``B_r`` per ``d`` keeps it
under the 48 KiB a numba kernel may declare statically (:data:`BLOCK_Q`).

(This module is imported as part of :mod:`flashlab`, whose import has already chosen GPU or simulator
before numba is first imported.)
"""

from __future__ import annotations

import math
from functools import cache

from numba import cuda, float32

from flashlab.kernels import HEAD_DIMS

BLOCK_K = 32  # B_c: keys per thread block = threads per warp
WARPS = 4  # warps per thread block; they split each Q tile's rows
BLOCK_Q = {16: 64, 32: 64, 64: 32, 128: 8}  # B_r per head dim d (HEAD_DIMS): shared memory <= 48 KiB
PREPROCESS_THREADS = 128


def shared_bytes(d: int) -> int:
    """Shared memory one thread block of :func:`backward_kernel` declares, in bytes."""
    b_r, b_c = BLOCK_Q[d], BLOCK_K
    return 4 * (2 * b_c * (d + 1) + 2 * b_r * d + b_r * b_c + 2 * b_r)


@cuda.jit(fastmath=True)
def preprocess_kernel(o, do, delta, dq):
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


@cuda.jit(device=True)
def load_rows(dst_a, dst_b, src_a, src_b, b, row0, n, cols, t, threads):
    """Stage rows ``row0 ..`` of ``src_a[b]``, ``src_b[b]`` (``cols`` columns) in shared ``dst_a``, ``dst_b``.

    The ``threads`` threads of the block split the elements, consecutive threads taking consecutive
    columns (coalesced reads); rows at or past ``n`` are filled with zeros.
    """
    for e in range(t, dst_a.shape[0] * cols, threads):
        r = e // cols
        c = e - r * cols
        inside = row0 + r < n
        dst_a[r, c] = src_a[b, row0 + r, c] if inside else float32(0)
        dst_b[r, c] = src_b[b, row0 + r, c] if inside else float32(0)


@cache
def backward_kernel(d: int):
    """The backward kernel for head dim ``d`` (tile sizes and local arrays are compile-time constants).

    Launch: grid ``(ceil(N_k / BLOCK_K), B)``, block ``(BLOCK_K, WARPS)`` threads. Arguments:
    ``q, do, dq (B, N_q, d)``; ``k, v, dk, dv (B, N_k, d)``; ``lse, delta (B, N_q)``, all float32;
    ``scale`` (float32), ``offset = N_k - N_q`` (bottom-right causal: query i sees key j iff
    ``j <= i + offset``), ``causal`` (bool). ``dq`` must hold zeros (see :func:`preprocess_kernel`).
    """
    if d not in BLOCK_Q:
        raise ValueError(f"d must be one of {HEAD_DIMS} for the backward kernel, got {d}")
    b_r, b_c = BLOCK_Q[d], BLOCK_K
    row = d + 1  # K_j, V_j rows padded by one float: no shared-memory bank conflicts (see the module doc)
    threads = b_c * WARPS

    @cuda.jit(fastmath=True)  # exp by the special-function unit (about 1e-6 relative error)
    def kernel(q, k, v, do, lse, delta, dq, dk, dv, scale, offset, causal):
        b = cuda.blockIdx.y
        t, w = cuda.threadIdx.x, cuda.threadIdx.y  # key t of the block; rows w, w + WARPS, ... of a tile
        tid = w * b_c + t
        j0 = cuda.blockIdx.x * b_c
        j = j0 + t  # this thread's key
        n_q, n_k = q.shape[1], k.shape[1]
        k_s = cuda.shared.array((b_c, row), float32)
        v_s = cuda.shared.array((b_c, row), float32)
        q_s = cuda.shared.array((b_r, d), float32)
        do_s = cuda.shared.array((b_r, d), float32)
        ds_s = cuda.shared.array((b_r, b_c), float32)
        lse_s = cuda.shared.array(b_r, float32)
        d_s = cuda.shared.array(b_r, float32)
        dk_acc = cuda.local.array(d, float32)
        dv_acc = cuda.local.array(d, float32)

        load_rows(k_s, v_s, k, v, b, j0, n_k, d, tid, threads)  # line 7: load K_j, V_j
        for c in range(d):  # line 8: dK_j = dV_j = 0 on chip
            dk_acc[c] = 0
            dv_acc[c] = 0

        first_row = 0
        if causal:  # Q blocks above the diagonal see none of these keys: skipped
            first_row = max(0, j0 - offset) // b_r * b_r
        for i0 in range(first_row, n_q, b_r):  # line 9
            cuda.syncthreads()  # the previous tile's dQ step has finished with q_s, ds_s
            # Line 10: load Q_i, dO_i, lse_i, D_i (dQ_i is read-modify-written by the atomics).
            load_rows(q_s, do_s, q, do, b, i0, n_q, d, tid, threads)
            for r in range(tid, b_r, threads):
                inside = i0 + r < n_q
                lse_s[r] = lse[b, i0 + r] if inside else float32(0)
                d_s[r] = delta[b, i0 + r] if inside else float32(0)
            cuda.syncthreads()
            for r in range(w, b_r, WARPS):
                i = i0 + r
                ds = float32(0)
                if i < n_q and j < n_k and (not causal or j <= i + offset):  # line 12: mask
                    s = float32(0)
                    dp = float32(0)
                    for c in range(d):
                        s += q_s[r, c] * k_s[t, c]  # line 11: S_ij = Q_i K_j^T (scaled below)
                        dp += do_s[r, c] * v_s[t, c]  # line 17: dP_ij = dO_i V_j^T
                    p = math.exp(s * scale - lse_s[r])  # line 13: P_ij from lse
                    ds = p * (dp - d_s[r])  # line 20: dS_ij = P_ij (dP_ij - D_i)
                    for c in range(d):
                        dv_acc[c] += p * do_s[r, c]  # line 16: dV_j += P^T dO_i
                        dk_acc[c] += ds * q_s[r, c]  # line 22: dK_j += dS^T Q_i (times scale at the end)
                ds_s[r, t] = ds
            cuda.syncthreads()
            # Line 21: dQ_i += scale dS K_j, one atomic add per element of the B_r x d tile.
            for e in range(tid, b_r * d, threads):
                r = e // d
                c = e - r * d
                if i0 + r < n_q:
                    acc = float32(0)
                    for u in range(b_c):
                        acc += ds_s[r, u] * k_s[u, c]
                    cuda.atomic.add(dq, (b, i0 + r, c), scale * acc)
        # Sum the warps' shares of dK_j, dV_j in shared memory (K_j, V_j are no longer needed), one
        # warp after the other, then write dK_j, dV_j (line 24), coalesced.
        for phase in range(WARPS):
            cuda.syncthreads()
            if w == phase:
                for c in range(d):
                    k_s[t, c] = dk_acc[c] + (k_s[t, c] if phase > 0 else float32(0))
                    v_s[t, c] = dv_acc[c] + (v_s[t, c] if phase > 0 else float32(0))
        cuda.syncthreads()
        for e in range(tid, b_c * d, threads):
            r = e // d
            c = e - r * d
            if j0 + r < n_k:
                dk[b, j0 + r, c] = scale * k_s[r, c]
                dv[b, j0 + r, c] = v_s[r, c]

    return kernel
