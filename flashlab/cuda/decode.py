"""Split-KV decoding (flash-decoding) in numba.cuda: a partial-state kernel and a combine kernel.

:func:`flashlab.split_kv.split_kv_attention` on a GPU. Decoding has a few query rows per sequence
(1 for plain decoding, a few for speculative decoding), so FlashAttention-2's grid of one block
per (batch x head, query block) leaves most SMs idle. Here the grid is ``(splits, BH)``:

1. :func:`decode_source` (grid ``(splits, BH)``, ``threads`` threads per block): block ``(s, bh)``
   walks keys ``s*chunk .. (s+1)*chunk - 1`` of head ``bh`` in tiles of ``threads`` keys. Thread
   ``t`` computes the scores of key ``j0 + t`` for all query rows (its K row read once, straight
   from global memory: consecutive threads read consecutive rows, each 32-byte sector is used by
   eight or sixteen successive loads of the same thread, through the L1 cache), the block finds
   the tile's row maxima in shared memory (the online softmax, Algorithm 1 lines 9-11), and
   thread ``t`` accumulates output columns ``t, t + threads, ..`` of every row, reading V rows
   *coalesced* (consecutive threads, consecutive columns). It writes its split's partial state as
   ``(o_s, lse_s)``: a :class:`flashlab.online_softmax.State` with ``m = lse_s``, ``l = 1``.
2. :func:`combine_source` (grid ``(N_q, BH)``, ``d`` threads): chapter 1's merge of all splits,
   ``lse = log sum_s exp(lse_s)``, ``o = sum_s exp(lse_s - lse) o_s``.

K and V may be stored as float32 or float16 (half the bytes read); everything is computed in
float32. Indices into the arrays are unsigned (``uint64``), so numba emits no negative-index
wrap-around test. Every K and V element is read exactly once (:func:`count_traffic` counts it).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import cuda, float32, uint64

from flashlab import device
from flashlab.split_kv import auto_splits, check_splits
from flashlab.traffic import Traffic

HEAD_DIMS = (64, 128)
MAX_ROWS = 8  # query rows per sequence: decoding (1) and speculative decoding (a few)
KV_DTYPES = ("float32", "float16")

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
NEG_INF = np.float32(-np.inf)
LOG2E = np.float32(math.log2(math.e))
LN2 = np.float32(math.log(2.0))

last_run = "no decoding kernel has run yet"


@cache
def decode_source(d: int, rows: int, threads: int, causal: bool):
    """Kernel 1, partial states: ``decode(q, k, v, part_o, part_lse, n_k, chunk, scale, offset)``.

    ``q (BH, rows, d)`` float32; ``k, v (BH, N_k, d)`` float32 or float16; ``part_o (BH, splits,
    rows, d)``, ``part_lse (BH, splits, rows)`` float32 outputs; ``chunk`` keys per split;
    ``offset = N_k - N_q`` (bottom-right causal: row ``r`` sees keys ``j <= r + offset``).
    ``threads`` divides ``d``; thread ``t`` owns output columns ``t + threads * e``.
    """
    D, R, T, CAUSAL = d, rows, threads, causal
    E = D // T  # output columns per thread

    def decode(q, k, v, part_o, part_lse, n_k, chunk, scale, offset):
        q_sh = cuda.shared.array((R, D), float32)
        s_sh = cuda.shared.array((R, T), float32)
        p_sh = cuda.shared.array((R, T), float32)
        s = cuda.local.array(R, float32)
        m = cuda.local.array(R, float32)
        l = cuda.local.array(R, float32)  # noqa: E741 (the paper's name)
        acc = cuda.local.array((R, E), float32)
        split = cuda.blockIdx.x
        bh = uint64(cuda.blockIdx.y)
        t = cuda.threadIdx.x
        c0 = split * chunk
        c1 = min(c0 + chunk, n_k)  # causal, bottom-right: the last row sees every key, all are read
        scale2 = scale * LOG2E  # exp2 is the exponential of scores in log2 units
        for e in range(t, R * D, T):
            q_sh[e // D, e % D] = q[bh, uint64(e // D), uint64(e % D)] * scale2
        for r in range(R):
            m[r] = NEG_INF
            l[r] = ZERO
            for e in range(E):
                acc[r, e] = ZERO
        cuda.syncthreads()
        for j0 in range(c0, c1, T):
            j = j0 + t
            for r in range(R):
                s[r] = ZERO
            if j < c1:  # S = Q K^T for key j: one K row, each value used by every query row
                for c in range(D):
                    kc = float32(k[bh, uint64(j), uint64(c)])
                    for r in range(R):
                        s[r] += q_sh[r, c] * kc
            for r in range(R):
                visible = j < c1 and (not CAUSAL or j <= r + offset)
                s_sh[r, t] = s[r] if visible else NEG_INF
            cuda.syncthreads()
            for r in range(R):  # every thread finds the tile's row max (broadcast reads)
                mx = m[r]
                for u in range(T):
                    mx = max(mx, s_sh[r, u])
                m_use = ZERO if mx == NEG_INF else mx  # a row with no key yet stays 0, never nan
                alpha = math.exp2(m[r] - m_use)
                m[r] = mx
                l[r] *= alpha
                for e in range(E):
                    acc[r, e] *= alpha
                p_sh[r, t] = math.exp2(s_sh[r, t] - m_use)  # this thread's key
            cuda.syncthreads()
            for u in range(min(T, c1 - j0)):  # O += P V: V rows read coalesced, once
                for e in range(E):
                    vc = float32(v[bh, uint64(j0 + u), uint64(t + T * e)])
                    for r in range(R):
                        acc[r, e] += p_sh[r, u] * vc
                for r in range(R):
                    l[r] += p_sh[r, u]
            # no barrier here: a thread may start the next tile's scores (s_sh) while others still
            # read p_sh; it writes p_sh again only after the next barrier, when all are done
        for r in range(R):
            inv = ONE / l[r] if l[r] > ZERO else ZERO
            for e in range(E):
                part_o[bh, uint64(split), uint64(r), uint64(t + T * e)] = acc[r, e] * inv
            if t == 0:  # natural-log lse of the split: (m + log2 l) ln 2
                lse_r = (m[r] + math.log2(l[r])) * LN2 if l[r] > ZERO else NEG_INF
                part_lse[bh, uint64(split), uint64(r)] = lse_r

    return decode


@cache
def combine_source(d: int):
    """Kernel 2, the merge: ``combine(part_o, part_lse, o, lse, splits)``, grid ``(N_q, BH)``, ``d`` threads.

    The block loads its row's ``splits`` lse values into shared memory once (launch with
    ``4 * splits`` bytes of dynamic shared memory); thread ``c`` then merges column ``c``.
    """

    def combine(part_o, part_lse, o, lse, splits):
        lse_sh = cuda.shared.array(0, float32)
        r = uint64(cuda.blockIdx.x)
        bh = uint64(cuda.blockIdx.y)
        c = cuda.threadIdx.x
        for s in range(c, splits, d):
            lse_sh[s] = part_lse[bh, uint64(s), r]
        cuda.syncthreads()
        mx = NEG_INF
        for s in range(splits):
            mx = max(mx, lse_sh[s])
        total = ZERO
        out = ZERO
        if mx > NEG_INF:
            for s in range(splits):
                w = math.exp(lse_sh[s] - mx)  # exp(-inf) = 0: an empty split adds nothing
                total += w
                out += w * part_o[bh, uint64(s), r, uint64(c)]
        o[bh, r, uint64(c)] = out / total if total > ZERO else ZERO
        if c == 0:
            lse[bh, r] = mx + math.log(total) if total > ZERO else NEG_INF

    return combine


@cache
def _compiled(source):
    return cuda.jit(source, fastmath=True) if device.MODE == "gpu" else cuda.jit(source)


def default_threads(d: int) -> int:
    """Threads per block (= keys per tile) of the partial-state kernel: ``d`` (64 or 128)."""
    return d


def _is_torch_cuda(x) -> bool:
    return hasattr(x, "is_cuda") and hasattr(x, "__cuda_array_interface__") and bool(x.is_cuda)


def _check(q_shape, k_shape, v_shape, q_dtype, kv_dtypes, threads) -> tuple[int, int, int]:
    """ValueError naming what the kernels do not support; returns ``(rows, n_k, d)``."""
    if len(q_shape) < 2 or len(k_shape) < 2 or len(v_shape) < 2:
        raise ValueError(
            f"q, k, v must have at least 2 dims (..., N, d), got {q_shape}, {k_shape}, {v_shape}"
        )
    rows, d, n_k = q_shape[-2], q_shape[-1], k_shape[-2]
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim d={d} is not supported by the decoding kernel; supported: {HEAD_DIMS}")
    if k_shape[-1] != d or v_shape[-1] != d or v_shape[-2] != n_k:
        raise ValueError(f"k and v must be (..., N_k, d) with q's d={d}, got k {k_shape}, v {v_shape}")
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(
            f"q has {rows} query rows per sequence; the decoding kernel takes 1..{MAX_ROWS} "
            "(use flashlab.cuda's forward kernels for prefill)"
        )
    if q_dtype not in ("float32", "float16"):
        raise ValueError(f"q must be float32 (or float16), got {q_dtype}")
    if len(set(kv_dtypes)) != 1 or kv_dtypes[0] not in KV_DTYPES:
        raise ValueError(f"k and v must both be stored as one of {KV_DTYPES}, got {kv_dtypes}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1 or d % threads:
        raise ValueError(f"threads must be a positive integer dividing d={d} (e.g. {d}), got {threads!r}")
    return rows, n_k, d


def launch(q, k, v, o, lse, part_o, part_lse, *, scale: float, causal: bool, threads: int) -> None:
    """Run both kernels on 3-d arrays: ``q (BH, rows, d)``, ``k, v (BH, N_k, d)`` into ``o, lse``.

    ``part_o (BH, splits, rows, d)`` and ``part_lse (BH, splits, rows)`` are the workspace; arrays
    are whatever the mode takes (NumPy arrays in the simulator, device arrays or CUDA tensors).
    """
    global last_run
    bh, rows, d = q.shape
    n_k, splits = k.shape[1], part_o.shape[1]
    chunk = math.ceil(n_k / splits) if n_k else 0
    decode = _compiled(decode_source(d, rows, threads, causal))
    decode[(splits, bh), threads](q, k, v, part_o, part_lse, n_k, chunk, np.float32(scale), n_k - rows)
    _compiled(combine_source(d))[(rows, bh), d, 0, 4 * splits](part_o, part_lse, o, lse, splits)
    where = "GPU" if device.MODE == "gpu" else "simulator"
    last_run = (
        f"split-KV decode on the {where}: {splits} splits of {chunk} keys, grid ({splits}, {bh}) x "
        f"{threads} threads, then combine grid ({rows}, {bh}) x {d} threads; K/V {k.dtype}"
    )


def decode_attention(q, k, v, *, splits="auto", causal=False, scale=None, return_lse=False, threads=None):
    """Split-KV decoding attention by the two kernels: ``o (..., N_q, d)`` (and ``lse (..., N_q)``).

    ``q (..., N_q, d)`` with ``1 <= N_q <=`` :data:`MAX_ROWS`, float32 (float16 is lifted);
    ``k, v (..., N_k, d)`` stored both float32 or both float16; ``d`` in :data:`HEAD_DIMS`; leading
    dims broadcast; ``causal`` bottom-right as in :func:`flashlab.naive_attention`. ``splits``: a
    positive integer or ``"auto"`` (:func:`flashlab.split_kv.auto_splits` with as many blocks per
    SM as fit, 2048 threads each). NumPy in, NumPy float32 out; torch CUDA tensors in, tensors out.
    """
    threads_ = default_threads(np.shape(q)[-1]) if threads is None else threads
    dtypes = [str(x.dtype).removeprefix("torch.") for x in (q, k, v)]
    rows, n_k, d = _check(tuple(q.shape), tuple(k.shape), tuple(v.shape), dtypes[0], dtypes[1:], threads_)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0 (default 1/sqrt(d)), got {scale}")
    lead = tuple(np.broadcast_shapes(tuple(q.shape[:-2]), tuple(k.shape[:-2]), tuple(v.shape[:-2])))
    bh = math.prod(lead)
    if isinstance(splits, str) and splits == "auto":
        splits = auto_splits(n_k, bh, blocks_per_sm=2048 // threads_)
    splits = check_splits(splits, n_k, bh)
    if _is_torch_cuda(q):
        import torch

        q3, k3, v3 = (
            x.expand(lead + tuple(x.shape[-2:])).reshape(bh, x.shape[-2], d).contiguous() for x in (q, k, v)
        )
        q3 = q3.float()
        out = [
            torch.empty(shape, dtype=torch.float32, device=q.device) for shape in _shapes(bh, rows, d, splits)
        ]
        launch(
            q3, k3, v3, *(cuda.as_cuda_array(x) for x in out), scale=scale, causal=causal, threads=threads_
        )
        o, lse = out[0].reshape(lead + (rows, d)), out[1].reshape(lead + (rows,))
        return (o, lse) if return_lse else o
    q3, k3, v3 = (
        np.ascontiguousarray(np.broadcast_to(x, lead + x.shape[-2:]).reshape(bh, -1, d)) for x in (q, k, v)
    )
    host = [q3.astype(np.float32), k3, v3] + [
        np.empty(shape, np.float32) for shape in _shapes(bh, rows, d, splits)
    ]
    dev = [cuda.to_device(x) for x in host]
    launch(*dev, scale=scale, causal=causal, threads=threads_)
    o, lse = dev[3].copy_to_host().reshape(lead + (rows, d)), dev[4].copy_to_host().reshape(lead + (rows,))
    return (o, lse) if return_lse else o


def _shapes(bh: int, rows: int, d: int, splits: int) -> list[tuple]:
    """Shapes of ``o, lse, part_o, part_lse``."""
    return [(bh, rows, d), (bh, rows), (bh, splits, rows, d), (bh, splits, rows)]


def decode_traffic(bh: int, rows: int, n_k: int, d: int, splits: int) -> Traffic:
    """The two kernels' global-memory traffic in elements, from their loops (for any ``causal``).

    Partial-state kernel: each of the ``splits`` blocks of a head loads Q (``rows d``), K and V are
    read once (``N_k d`` each), each block writes its ``(o_s, lse_s)``. Combine: reads every
    ``(o_s, lse_s)`` once, writes ``o`` and ``lse``. Times ``BH``.
    """
    reads = {
        "Q": splits * rows * d,
        "K": n_k * d,
        "V": n_k * d,
        "part_o": splits * rows * d,
        "part_lse": splits * rows,
    }
    writes = {"part_o": splits * rows * d, "part_lse": splits * rows, "O": rows * d, "lse": rows}
    return Traffic({k: bh * n for k, n in reads.items()}, {k: bh * n for k, n in writes.items()})


def count_traffic(
    q, k, v, *, splits, causal=False, scale=None, threads=None
) -> tuple[Traffic, np.ndarray, np.ndarray]:
    """Run both kernels in the simulator over counting arrays: ``(Traffic, o, lse)``.

    3-d NumPy inputs ``q (BH, rows, d)``, ``k, v (BH, N_k, d)``, as :func:`decode_attention` takes
    them; keep them tiny. Counts are element reads and writes per tensor (:class:`flashlab.traffic.Traffic`).
    """
    from flashlab.kernel_traffic import Counted, simulate

    threads = default_threads(q.shape[-1]) if threads is None else threads
    rows, n_k, d = _check(q.shape, k.shape, v.shape, str(q.dtype), [str(k.dtype), str(v.dtype)], threads)
    bh = q.shape[0]
    splits = check_splits(splits, n_k, bh)
    scale = np.float32(1.0 / math.sqrt(d) if scale is None else scale)
    o, lse, part_o, part_lse = (np.full(shape, np.nan, np.float32) for shape in _shapes(bh, rows, d, splits))
    names = ("Q", "K", "V", "O", "lse", "part_o", "part_lse")
    arrays = dict(zip(names, (Counted(x) for x in (q, k, v, o, lse, part_o, part_lse)), strict=True))
    chunk = math.ceil(n_k / splits) if n_k else 0
    simulate(
        decode_source(d, rows, threads, causal),
        (splits, bh),
        (threads,),
        (
            arrays["Q"],
            arrays["K"],
            arrays["V"],
            arrays["part_o"],
            arrays["part_lse"],
            n_k,
            chunk,
            scale,
            n_k - rows,
        ),
    )
    simulate(
        combine_source(d),
        (rows, bh),
        (d,),
        (arrays["part_o"], arrays["part_lse"], arrays["O"], arrays["lse"], splits),
        4 * splits,
    )
    traffic = Traffic({n: a.reads() for n, a in arrays.items()}, {n: a.writes() for n, a in arrays.items()})
    return traffic, o, lse
