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
from collections.abc import Callable
from functools import cache

import numpy as np
from numba import cuda, float32, uint64

from flashlab import device
from flashlab.cuda.spec import KernelSpec
from flashlab.inputs import check_scale
from flashlab.split_kv import auto_splits, check_splits
from flashlab.traffic import Traffic

MAX_ROWS = 8  # query rows per sequence: decoding (1) and speculative decoding (a few)
KV_DTYPES = ("float32", "float16")
#: the registry's default tiles per head dim: threads per block (= keys per tile), query rows
TILES = {64: {"threads": 64, "rows": 1}, 128: {"threads": 128, "rows": 1}}
HEAD_DIMS = tuple(TILES)
PARAMS = ("q", "k", "v", "part_o", "part_lse", "n_k", "chunk", "scale", "offset")
COMBINE_PARAMS = ("part_o", "part_lse", "o", "lse", "splits")

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
NEG_INF = np.float32(-np.inf)
LOG2E = np.float32(math.log2(math.e))
LN2 = np.float32(math.log(2.0))


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


def decode_spec(
    d: int, causal: bool, t: dict, device_fn: Callable, target: str, kv_dtype="float32"
) -> KernelSpec:
    """The registry's factory: kernel 1 for head dim ``d``, tiles ``threads`` and ``rows``, a
    ``kv_dtype`` cache; grid ``(splits, BH)`` from the ``part_o`` argument. ``device_fn`` is unused
    (the kernel calls no helper)."""
    if d % t["threads"]:
        raise ValueError(f"decode: threads={t['threads']} must divide d={d}")
    if t["rows"] > MAX_ROWS:
        raise ValueError(f"decode: rows={t['rows']} query rows per sequence; the kernel takes 1..{MAX_ROWS}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"decode: kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    signature = (
        f"void(float32[:, :, ::1], {kv_dtype}[:, :, ::1], {kv_dtype}[:, :, ::1], float32[:, :, :, ::1], "
        "float32[:, :, ::1], int64, int64, float32, int64)"
    )
    source = decode_source(d, t["rows"], t["threads"], causal)
    return KernelSpec(
        "decode", d, causal, source, PARAMS, lambda a: (a["part_o"].shape[1], a["q"].shape[0]),
        (t["threads"],), 0, signature, tuple(t.items()) + (("kv_dtype", kv_dtype),), target,
    )  # fmt: skip


def combine_spec(d: int, splits: int, target: str) -> KernelSpec:
    """Kernel 2 for head dim ``d`` and ``splits`` partial states (``4 splits`` B of dynamic shared memory)."""
    signature = "void(float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1], float32[:, ::1], int64)"
    return KernelSpec(
        "combine", d, False, combine_source(d), COMBINE_PARAMS, lambda a: (a["o"].shape[1], a["o"].shape[0]),
        (d,), 4 * splits, signature, (("splits", splits),), target,
    )  # fmt: skip


def specs(d: int, rows: int, causal: bool, kv_dtype: str, splits: int, threads=None, target=None):
    """Both kernels' specs for ``target``: ``"gpu"`` or ``"sim"`` (default: where kernels run now)."""
    from flashlab.cuda.registry import make_kernel

    target = target or ("gpu" if device.MODE == "gpu" else "sim")
    tiles = {"rows": rows} | ({} if threads is None else {"threads": threads})
    return make_kernel("decode", d, causal, target=target, kv_dtype=kv_dtype, **tiles), combine_spec(
        d, splits, target
    )


def run(first: KernelSpec, combine: KernelSpec, args: dict, *, make=None) -> None:
    """Launch both kernels with the named ``args`` (:data:`PARAMS` and :data:`COMBINE_PARAMS`)."""
    from flashlab.cuda import launch

    launch.run(first, args, make=make)
    summary = launch.last_run
    launch.run(combine, args, make=make)
    launch.last_run = f"{summary}; then {launch.last_run}"


def args_for(q, k, v, o, lse, part_o, part_lse, scale: float) -> dict:
    """Both kernels' named arguments, from 3-d ``q (BH, rows, d)``, ``k, v (BH, N_k, d)`` and the outputs."""
    n_k, splits, rows = k.shape[1], part_o.shape[1], q.shape[1]
    chunk = math.ceil(n_k / splits) if n_k else 0
    arrays = dict(q=q, k=k, v=v, o=o, lse=lse, part_o=part_o, part_lse=part_lse)
    return arrays | dict(n_k=n_k, chunk=chunk, scale=np.float32(scale), offset=n_k - rows, splits=splits)


def _check(q_shape, k_shape, v_shape, q_dtype, kv_dtypes) -> tuple[int, int, int]:
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
            "(use flashlab.cuda.flash_attention for prefill)"
        )
    if q_dtype not in ("float32", "float16"):
        raise ValueError(f"q must be float32 (or float16), got {q_dtype}")
    if len(set(kv_dtypes)) != 1 or kv_dtypes[0] not in KV_DTYPES:
        raise ValueError(f"k and v must both be stored as one of {KV_DTYPES}, got {kv_dtypes}")
    return rows, n_k, d


def decode_attention(q, k, v, *, splits="auto", causal=False, scale=None, return_lse=False, threads=None):
    """Split-KV decoding attention by the two kernels: ``o (..., N_q, d)`` (and ``lse (..., N_q)``).

    ``q (..., N_q, d)`` with ``1 <= N_q <=`` :data:`MAX_ROWS`, float32 (float16 is lifted);
    ``k, v (..., N_k, d)`` stored both float32 or both float16; ``d`` in :data:`HEAD_DIMS`; leading
    dims broadcast; ``causal`` bottom-right as in :func:`flashlab.naive_attention`. ``splits``: a
    positive integer or ``"auto"`` (:func:`flashlab.split_kv.auto_splits` with as many blocks per
    SM as fit, 2048 threads each); ``threads``: per block of kernel 1 (divides d; default d).
    NumPy in, NumPy float32 out; torch CUDA tensors in, tensors out (no copies of K and V).
    """
    from flashlab.cuda.launch import is_cuda_tensor

    dtypes = [str(x.dtype).removeprefix("torch.") for x in (q, k, v)]
    rows, n_k, d = _check(tuple(q.shape), tuple(k.shape), tuple(v.shape), dtypes[0], dtypes[1:])
    scale = check_scale(scale, d)
    lead = tuple(np.broadcast_shapes(tuple(q.shape[:-2]), tuple(k.shape[:-2]), tuple(v.shape[:-2])))
    bh = math.prod(lead)
    if isinstance(splits, str) and splits == "auto":
        splits = auto_splits(n_k, bh, blocks_per_sm=2048 // (threads or TILES[d]["threads"]))
    splits = check_splits(splits, n_k, bh)
    first, combine = specs(d, rows, causal, dtypes[1], splits, threads)
    if is_cuda_tensor(q):
        import torch

        q3, k3, v3 = (x.expand(lead + tuple(x.shape[-2:])).reshape(bh, -1, d).contiguous() for x in (q, k, v))
        outs = [
            torch.empty(shape, dtype=torch.float32, device=q.device)
            for shape in buffer_shapes(bh, rows, d, splits)
        ]
        run(first, combine, args_for(*(cuda.as_cuda_array(x) for x in (q3.float(), k3, v3, *outs)), scale))
        o, lse = outs[0].reshape(lead + (rows, d)), outs[1].reshape(lead + (rows,))
        return (o, lse) if return_lse else o
    q3, k3, v3 = (
        np.ascontiguousarray(np.broadcast_to(x, lead + x.shape[-2:]).reshape(bh, -1, d)) for x in (q, k, v)
    )
    host = [q3.astype(np.float32), k3, v3] + [
        np.empty(shape, np.float32) for shape in buffer_shapes(bh, rows, d, splits)
    ]
    args = args_for(*(cuda.to_device(x) if device.MODE == "gpu" else x for x in host), scale)
    run(first, combine, args)
    o, lse = (args[name].copy_to_host() if device.MODE == "gpu" else args[name] for name in ("o", "lse"))
    o, lse = o.reshape(lead + (rows, d)), lse.reshape(lead + (rows,))
    return (o, lse) if return_lse else o


def buffer_shapes(bh: int, rows: int, d: int, splits: int) -> list[tuple]:
    """Shapes of the outputs ``o, lse`` and the workspace ``part_o, part_lse`` (for :func:`args_for`)."""
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

    3-d NumPy inputs ``q (BH, rows, d)``, ``k, v (BH, N_k, d)``, as the kernels take them; keep them
    tiny. Counts are element reads and writes per tensor (:class:`flashlab.traffic.Traffic`).
    """
    from flashlab.cuda.traffic import CountingArray

    rows, n_k, d = _check(q.shape, k.shape, v.shape, str(q.dtype), [str(k.dtype), str(v.dtype)])
    bh = q.shape[0]
    splits = check_splits(splits, n_k, bh)
    first, combine = specs(d, rows, causal, str(k.dtype), splits, threads, target="sim")  # on any machine
    outs = [np.full(shape, np.nan, np.float32) for shape in buffer_shapes(bh, rows, d, splits)]  # poisoned
    counted = [CountingArray(x) for x in (q, k, v, *outs)]
    args = args_for(*counted, check_scale(scale, d))
    run(first, combine, args, make=CountingArray)
    names = {"Q": "q", "K": "k", "V": "v", "O": "o", "lse": "lse", "part_o": "part_o", "part_lse": "part_lse"}
    traffic = Traffic(
        {key: args[name].reads() for key, name in names.items()},
        {key: args[name].writes() for key, name in names.items()},
    )
    return traffic, outs[0], outs[1]
