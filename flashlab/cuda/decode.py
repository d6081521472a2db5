"""Split-KV decoding (flash-decoding) in numba.cuda: a partial-state kernel and a combine kernel.

:func:`flashlab.split_kv.split_kv_attention` on a GPU. Decoding has a few query rows per sequence
(1 for plain decoding, a few for speculative decoding), so FlashAttention-2's grid of one block
per (batch x head, query block) leaves most SMs idle. Here the grid is ``(splits, BH)``:

1. :func:`decode_source` (grid ``(splits, BH)``, ``threads`` threads per block): block ``(s, bh)``
   walks keys ``s*chunk .. (s+1)*chunk - 1`` of head ``bh``, warp-cooperatively and with no
   barrier in the key loop. A K row is ``G = 4 d / 16`` (float32) or ``2 d / 16`` (float16)
   16-byte chunks; a *key group* of ``G`` lanes reads one row, lane ``i`` chunk ``i`` by one
   16-byte load (:func:`flashlab.cuda.ptx.ld_global_v4`), so a warp reads ``32 / G`` whole rows
   per instruction. Each lane takes the dot product of its chunk with q's (kept in registers),
   the group sums it by ``log2 G`` shuffles, and the same lane then owns the same columns of the
   V row: ``O += p V`` is lane-local. Each group keeps its own online softmax (Algorithm 1 lines
   9-11) over ``unroll`` keys per iteration; the ``2 unroll`` loads of the next iteration's keys are
   issued before this iteration's are computed (software pipelining: ``32 unroll`` bytes in flight
   per lane hide the memory latency). At the end the groups of a warp merge by shuffles and the
   warps through shared memory (chapter 1's merge). It writes the split's partial state as
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
from numba import cuda, float32, uint32, uint64

from flashlab import device
from flashlab.cuda import ptx
from flashlab.cuda.spec import STATIC_SHARED_LIMIT, KernelSpec
from flashlab.inputs import check_scale
from flashlab.split_kv import auto_splits, check_splits
from flashlab.traffic import Traffic

MAX_ROWS = 8  # query rows per sequence: decoding (1) and speculative decoding (a few)
KV_DTYPES = ("float32", "float16")
#: the registry's default tiles per head dim: threads per block (whole warps), query rows, keys per
#: key group and iteration
TILES = {64: {"threads": 128, "rows": 1, "unroll": 4}, 128: {"threads": 128, "rows": 1, "unroll": 4}}
HEAD_DIMS = tuple(TILES)
PARAMS = ("q", "k", "v", "part_o", "part_lse", "n_k", "chunk", "scale", "offset")
COMBINE_PARAMS = ("part_o", "part_lse", "o", "lse", "splits")

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
NEG_INF = np.float32(-np.inf)
LOG2E = np.float32(math.log2(math.e))
LN2 = np.float32(math.log(2.0))
WARP = 32


@cache
def decode_source(d: int, rows: int, threads: int, unroll: int, causal: bool, kv_dtype: str, target: str):
    """Kernel 1, partial states: ``decode(q, k, v, part_o, part_lse, n_k, chunk, scale, offset)``.

    ``q (BH, rows, d)`` float32; ``k, v (BH, N_k, d)`` ``kv_dtype`` (float32 or float16), 16-byte
    aligned; ``part_o (BH, splits, rows, d)``, ``part_lse (BH, splits, rows)`` float32 outputs;
    ``chunk`` keys per split; ``offset = N_k - N_q`` (bottom-right causal: row ``r`` sees keys
    ``j <= r + offset``). ``threads``: a multiple of 32; ``unroll``: keys per key group and iteration;
    ``target``: ``"gpu"`` or ``"sim"`` (which implementation of the PTX instructions it calls).
    """
    D, R, T, U, CAUSAL = d, rows, threads, unroll, causal
    HALF = kv_dtype == "float16"
    C = 16 // np.dtype(kv_dtype).itemsize  # elements per 16-byte chunk: 4 (float32) or 8 (float16)
    G = D // C  # lanes per key group: one K (or V) row of 16-byte chunks
    LOG_G, LOG_KG = G.bit_length() - 1, (WARP // G).bit_length() - 1
    NG, W = T // G, T // WARP  # key groups and warps per block
    STEP = NG * U  # keys per iteration of the block
    op = ptx.for_target(target)  # inline PTX on a GPU, the emulations in the simulator
    ld, unpack, as_f32, shfl = op["ld_global_v4"], op["unpack_f16x2"], op["as_f32"], op["shfl_xor"]

    def decode(q, k, v, part_o, part_lse, n_k, chunk, scale, offset):
        q_sh = cuda.shared.array((R, D), float32)
        m_sh = cuda.shared.array((R, W), float32)
        l_sh = cuda.shared.array((R, W), float32)
        o_sh = cuda.shared.array((R, W, D), float32)
        qc = cuda.local.array((R, C), float32)  # this lane's chunk of every query row, scaled
        m = cuda.local.array(R, float32)
        l = cuda.local.array(R, float32)  # noqa: E741 (the paper's name)
        acc = cuda.local.array((R, C), float32)  # this lane's columns of the group's O, unnormalised
        kw = cuda.local.array((U, 4), uint32)  # 16-byte chunks of the next iteration's K and V rows
        vw = cuda.local.array((U, 4), uint32)
        kc = cuda.local.array((U, 4), uint32)  # and of this iteration's
        vc = cuda.local.array((U, 4), uint32)
        x = cuda.local.array(C, float32)  # one chunk as float32
        s = cuda.local.array((U, R), float32)  # scores, then probabilities
        split = cuda.blockIdx.x
        bh = uint64(cuda.blockIdx.y)
        t = cuda.threadIdx.x
        group = t // G  # lanes G group .. G group + G - 1 read one key's row together
        col = (t % G) * C  # this lane's first column of every K and V row
        c0 = split * chunk
        c1 = min(c0 + chunk, n_k)  # causal, bottom-right: the last row sees every key, all are read
        scale2 = scale * LOG2E  # exp2 is the exponential of scores in log2 units
        for r in range(R):
            m[r] = NEG_INF
            l[r] = ZERO
            for c in range(C):
                acc[r, c] = ZERO
        # software-pipelined: iteration j0 issues the loads of keys j0 + STEP.. (2U loads, 32 U bytes
        # in flight per lane while it computes) and then the scores of keys j0.., loaded one
        # iteration earlier; block-uniform, so every lane takes part in every shuffle. The first
        # iteration (at least one, also for an empty split) stages q while its loads are in flight.
        for j0 in range(min(c0, c1) - STEP, c1, STEP):
            for u in range(U):
                for w in range(4):
                    kc[u, w], vc[u, w] = kw[u, w], vw[u, w]
                j = j0 + STEP + u * NG + group
                kw[u, 0], kw[u, 1], kw[u, 2], kw[u, 3] = ld(k, bh, uint64(j), uint64(col), j < c1)
                vw[u, 0], vw[u, 1], vw[u, 2], vw[u, 3] = ld(v, bh, uint64(j), uint64(col), j < c1)
            if j0 < c0:
                for e in range(t, R * D, T):
                    q_sh[e // D, e % D] = q[bh, uint64(e // D), uint64(e % D)] * scale2
                cuda.syncthreads()  # once per block
                for r in range(R):
                    for c in range(C):
                        qc[r, c] = q_sh[r, col + c]
                continue
            for u in range(U):  # S = Q K^T: a partial dot product per lane, summed over its group
                j = j0 + u * NG + group
                for w in range(4):
                    if HALF:
                        x[2 * w], x[2 * w + 1] = unpack(kc[u, w])
                    else:
                        x[w] = as_f32(kc[u, w])
                for r in range(R):
                    dot = ZERO
                    for c in range(C):
                        dot += qc[r, c] * x[c]
                    for b in range(LOG_G):  # lanes G/2, .., 2, 1 apart: the group's sum in every lane
                        dot += shfl(dot, G >> (b + 1))
                    visible = j < c1 and (not CAUSAL or j <= r + offset)
                    s[u, r] = dot if visible else NEG_INF
            for r in range(R):  # the group's online softmax over its U keys (Algorithm 1 lines 9-11)
                mx = m[r]
                for u in range(U):
                    mx = max(mx, s[u, r])
                m_use = ZERO if mx == NEG_INF else mx  # a row with no key yet stays 0, never nan
                alpha = math.exp2(m[r] - m_use)
                m[r] = mx
                l[r] *= alpha
                for c in range(C):
                    acc[r, c] *= alpha
                for u in range(U):
                    s[u, r] = math.exp2(s[u, r] - m_use)
                    l[r] += s[u, r]
            for u in range(U):  # O += P V: the lane owns the same columns of the V row, no shuffle
                for w in range(4):
                    if HALF:
                        x[2 * w], x[2 * w + 1] = unpack(vc[u, w])
                    else:
                        x[w] = as_f32(vc[u, w])
                for r in range(R):
                    for c in range(C):
                        acc[r, c] += s[u, r] * x[c]
        for b in range(LOG_KG):  # merge the warp's key groups (chapter 1): lanes G, 2G, .. apart
            for r in range(R):
                m_o, l_o = shfl(m[r], G << b), shfl(l[r], G << b)
                mx = max(m[r], m_o)
                m_use = ZERO if mx == NEG_INF else mx
                mine, theirs = math.exp2(m[r] - m_use), math.exp2(m_o - m_use)
                m[r] = mx
                l[r] = l[r] * mine + l_o * theirs
                for c in range(C):
                    acc[r, c] = acc[r, c] * mine + shfl(acc[r, c], G << b) * theirs
        if t % WARP < G:  # then the warps, through shared memory: group 0 of each holds its warp's state
            for r in range(R):
                if col == 0:
                    m_sh[r, t // WARP] = m[r]
                    l_sh[r, t // WARP] = l[r]
                for c in range(C):
                    o_sh[r, t // WARP, col + c] = acc[r, c]
        cuda.syncthreads()
        for e in range(t, R * D, T):  # one element of the split's (o_s, lse_s) per thread
            r, c = e // D, e % D
            mx = NEG_INF
            for w in range(W):
                mx = max(mx, m_sh[r, w])
            m_use = ZERO if mx == NEG_INF else mx
            total = ZERO
            out = ZERO
            for w in range(W):
                f = math.exp2(m_sh[r, w] - m_use)
                total += l_sh[r, w] * f
                out += o_sh[r, w, c] * f
            part_o[bh, uint64(split), uint64(r), uint64(c)] = out / total if total > ZERO else ZERO
            if c == 0:  # natural-log lse of the split: (m + log2 l) ln 2
                lse_r = (m_use + math.log2(total)) * LN2 if total > ZERO else NEG_INF
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
    """The registry's factory: kernel 1 for head dim ``d``, tiles ``threads``, ``rows`` and ``unroll``,
    a ``kv_dtype`` cache; grid ``(splits, BH)`` from the ``part_o`` argument. ``device_fn`` is unused
    (the kernel calls only :mod:`flashlab.cuda.ptx` intrinsics)."""
    if t["threads"] % WARP or t["threads"] > 1024:
        raise ValueError(
            f"decode: threads={t['threads']} must be a multiple of {WARP} (whole warps), <= 1024"
        )
    if t["rows"] > MAX_ROWS:
        raise ValueError(f"decode: rows={t['rows']} query rows per sequence; the kernel takes 1..{MAX_ROWS}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"decode: kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    shared = 4 * t["rows"] * (d + t["threads"] // WARP * (d + 2))  # q, and every warp's (m, l, o)
    if shared > STATIC_SHARED_LIMIT:
        raise ValueError(
            f"decode: threads={t['threads']} with rows={t['rows']} at d={d} needs {shared} B of shared "
            f"memory, more than {STATIC_SHARED_LIMIT}; use fewer threads"
        )
    signature = (
        f"void(float32[:, :, ::1], {kv_dtype}[:, :, ::1], {kv_dtype}[:, :, ::1], float32[:, :, :, ::1], "
        "float32[:, :, ::1], int64, int64, float32, int64)"
    )
    source = decode_source(d, t["rows"], t["threads"], t["unroll"], causal, kv_dtype, target)
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


def specs(
    d: int, rows: int, causal: bool, kv_dtype: str, splits: int, threads=None, target=None, unroll=None
):
    """Both kernels' specs for ``target``: ``"gpu"`` or ``"sim"`` (default: where kernels run now);
    ``threads`` and ``unroll`` default to :data:`TILES`."""
    from flashlab.cuda.registry import make_kernel

    target = target or ("gpu" if device.MODE == "gpu" else "sim")
    given = {"threads": threads, "unroll": unroll}
    tiles = {"rows": rows} | {key: value for key, value in given.items() if value is not None}
    return make_kernel("decode", d, causal, target=target, kv_dtype=kv_dtype, **tiles), combine_spec(
        d, splits, target
    )


def run(first: KernelSpec, combine: KernelSpec, args: dict, *, make=None, stream=0) -> None:
    """Launch both kernels with the named ``args`` (:data:`PARAMS` and :data:`COMBINE_PARAMS`), one
    after the other on ``stream`` (GPU)."""
    from flashlab.cuda import launch

    launch.run(first, args, make=make, stream=stream)
    summary = launch.last_run
    launch.run(combine, args, make=make, stream=stream)
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


def default_splits(n_k: int, bh: int, threads: int) -> int:
    """``splits="auto"``: :func:`flashlab.split_kv.auto_splits` with as many blocks of ``threads`` per
    SM as 2048 threads make (the most an SM runs), so that the loads in flight fill HBM's pipe."""
    return auto_splits(n_k, bh, blocks_per_sm=2048 // threads)


def decode_attention(
    q, k, v, *, splits="auto", causal=False, scale=None, return_lse=False, threads=None, unroll=None
):
    """Split-KV decoding attention by the two kernels: ``o (..., N_q, d)`` (and ``lse (..., N_q)``).

    ``q (..., N_q, d)`` with ``1 <= N_q <=`` :data:`MAX_ROWS`, float32 (float16 is lifted);
    ``k, v (..., N_k, d)`` stored both float32 or both float16; ``d`` in :data:`HEAD_DIMS`; leading
    dims broadcast; ``causal`` bottom-right as in :func:`flashlab.naive_attention`. ``splits``: a
    positive integer or ``"auto"`` (:func:`default_splits`); ``threads`` (whole warps) and
    ``unroll``: kernel 1's tiles (default :data:`TILES`). CUDA tensors must be 16-byte aligned.
    NumPy in, NumPy float32 out; torch CUDA tensors in, tensors out (no copies of K and V).
    """
    from flashlab.cuda.launch import is_cuda_tensor

    dtypes = [str(x.dtype).removeprefix("torch.") for x in (q, k, v)]
    rows, n_k, d = _check(tuple(q.shape), tuple(k.shape), tuple(v.shape), dtypes[0], dtypes[1:])
    scale = check_scale(scale, d)
    lead = tuple(np.broadcast_shapes(tuple(q.shape[:-2]), tuple(k.shape[:-2]), tuple(v.shape[:-2])))
    bh = math.prod(lead)
    if isinstance(splits, str) and splits == "auto":
        splits = default_splits(n_k, bh, threads or TILES[d]["threads"])
    splits = check_splits(splits, n_k, bh)
    first, combine = specs(d, rows, causal, dtypes[1], splits, threads, unroll=unroll)
    if is_cuda_tensor(q):
        import torch

        q3, k3, v3 = (x.expand(lead + tuple(x.shape[-2:])).reshape(bh, -1, d).contiguous() for x in (q, k, v))
        for name, x in (("k", k3), ("v", v3)):
            if x.data_ptr() % 16:
                raise ValueError(f"{name} must start at a 16-byte aligned address (16-byte loads)")
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
    q, k, v, *, splits, causal=False, scale=None, threads=None, unroll=None
) -> tuple[Traffic, np.ndarray, np.ndarray]:
    """Run both kernels in the simulator over counting arrays: ``(Traffic, o, lse)``.

    3-d NumPy inputs ``q (BH, rows, d)``, ``k, v (BH, N_k, d)``, as the kernels take them; keep them
    tiny. Counts are element reads and writes per tensor (:class:`flashlab.traffic.Traffic`).
    """
    from flashlab.cuda.traffic import CountingArray

    rows, n_k, d = _check(q.shape, k.shape, v.shape, str(q.dtype), [str(k.dtype), str(v.dtype)])
    bh = q.shape[0]
    splits = check_splits(splits, n_k, bh)
    first, combine = specs(d, rows, causal, str(k.dtype), splits, threads, "sim", unroll)  # on any machine
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
