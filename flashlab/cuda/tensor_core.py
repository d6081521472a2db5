"""FlashAttention-2 forward on tensor cores: Q K^T and P V by ``mma.sync`` m16n8k16, bf16 or fp16 in.

A block of 4 warps owns 64 or 128 query rows of one head (16 or 32 per warp: one or two m-tiles,
the M of one mma, :data:`M_TILES`) and walks over
tiles of K and V (64 keys at d = 64, 32 at d = 128: :data:`TILE_KEYS`) staged in shared memory
(the paper's SRAM). The staging is asynchronous and double-buffered: while the warps compute tile
``j`` from one buffer, ``cp.async`` copies tile ``j + 1`` from global memory into the other, 16
bytes per instruction, with no register in between; one barrier per tile. Per tile each warp
computes its 16 x KEYS tile of S on the tensor cores (``d / 16`` mmas per 8 keys; K fragments by
``ldmatrix``), keeps the online-softmax state ``m, l`` and its 16 x d block of O in float32
registers (the C fragment layout), takes ``P = exp2(c S - c m)`` (one FMA and one ``ex2`` per score,
``c = scale log2 e``), rounds P to 16 bits (the mma's input format) and multiplies it by V on the
tensor cores (V fragments by ``ldmatrix.trans``). The C fragment of S is the A fragment of P,
register for register, so P never leaves the registers. Rows are reduced across the 4 lanes that
share them by ``shfl.xor``. Causal masking is bottom-right (query ``i`` sees keys
``j <= i + N_k - N_q``); tiles past the diagonal are skipped; tail tiles are masked.

Arguments (leading dims flattened into BH; 16-bit values travel as uint32 pairs, see
:mod:`flashlab.precision`): ``q (BH, N_q, d/2)`` uint32; ``k, v`` uint32, flat, ``BH N_k d/2``
words each (one index addresses both); ``o (BH, N_q, d/2)`` uint32 (rounded to the input format),
``lse (BH, N_q)`` float32 (natural log), ``n_q, n_k``, ``scale`` (float32), ``offset = N_k - N_q``.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import cuda, float32, uint32

from flashlab import device
from flashlab.cuda import ptx
from flashlab.cuda._numba import simulate
from flashlab.precision import DTYPES16, from_bits, to_bits

HEAD_DIMS = (64, 128)
WARPS = 4
#: 16-row m-tiles per warp, per (head dim, causal) (a block owns ``16 WARPS M_TILES`` query rows).
#: Two (each K/V fragment feeding two mmas, 253 registers at d = 64) won only at d = 64 non-causal
#: when timed on a GPU; elsewhere the extra registers cost more than the fragments saved.
M_TILES = {(64, False): 2, (64, True): 1, (128, False): 1, (128, True): 1}
#: keys per K/V tile, per head dim: two tiles of K and two of V fit the 48 KiB of static shared memory
TILE_KEYS = {64: 64, 128: 32}
PAD = 8  # 16-bit elements of padding per shared row: 16-byte aligned rows, no bank conflicts
LOG2E = np.float32(math.log2(math.e))
LN2 = np.float32(math.log(2.0))
NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)


@cache
def kernel_source(d: int, causal: bool, dtype: str, m_tiles: int | None = None):
    """The kernel for head dim ``d``, ``causal`` or not, inputs in ``dtype`` (bf16 or fp16), each warp
    owning ``m_tiles`` 16-row m-tiles (default :data:`M_TILES`): every K or V fragment loaded from
    shared memory then feeds ``m_tiles`` independent mmas."""
    if d not in HEAD_DIMS:
        raise ValueError(f"d: the tensor-core kernel supports head dims {HEAD_DIMS}, got {d}")
    if dtype not in DTYPES16:
        raise ValueError(f"dtype: got {dtype!r}; use one of {DTYPES16}")
    if m_tiles not in (None, 1, 2):
        raise ValueError(f"m_tiles: 1 or 2 16-row m-tiles per warp, got {m_tiles}")
    BLOCK_ROWS = block_rows(d, causal, m_tiles)
    MT = BLOCK_ROWS // (16 * WARPS)
    mma, pack = ptx.MMA[dtype], ptx.PACK[dtype]
    ldsm, ldsm_t, shfl, ex2 = ptx.ldmatrix_x4, ptx.ldmatrix_x4_trans, ptx.shfl_xor, ptx.ex2
    cp_async, cp_commit, cp_wait = ptx.cp_async16, ptx.cp_async_commit, ptx.cp_async_wait_all
    KEYS = TILE_KEYS[d]
    BUFFERED = 2 * KEYS  # rows of the two shared tiles (a constant: numba types the shape at compile time)
    W, SW, CH = d // 2, (d + PAD) // 2, d // 8  # words per row in global and shared memory; 16-byte chunks
    # k-steps of QK^T, S n-tiles, O n-tiles, PV k-steps
    KS, NS, NO, PK = d // 16, KEYS // 8, d // 8, KEYS // 16
    THREADS = 32 * WARPS
    COPIES, ROW_STEP = KEYS * CH // THREADS, THREADS // CH  # chunks per thread per tile; rows apart

    def flash_tc(q, k, v, o, lse, n_q, n_k, scale, offset):
        bh = cuda.blockIdx.y
        # causal: the last query blocks see the most keys; they start first, so no SM idles at the end
        rb = cuda.gridDim.x - 1 - cuda.blockIdx.x if causal else cuda.blockIdx.x
        tid = cuda.threadIdx.x
        lane = tid & 31
        g = lane >> 2
        t = lane & 3
        r0 = rb * BLOCK_ROWS + (tid >> 5) * 16 * MT  # this warp's first query row
        row0 = r0 + g  # this lane's rows in m-tile i: row0 + 16 i and row0 + 16 i + 8
        r_copy, w_copy = tid // CH, (tid % CH) * 4  # the first tile row and word this thread copies
        kv_row = bh * n_k  # k, v are flat: row j of head bh starts at word (bh N_k + j) W
        ks = cuda.shared.array((BUFFERED, SW), uint32, alignment=16)  # two tiles: one computed,
        vs = cuda.shared.array((BUFFERED, SW), uint32, alignment=16)  # the next one in flight
        qf = cuda.local.array((MT, KS, 4), uint32)
        s = cuda.local.array((MT, NS, 4), float32)
        acc = cuda.local.array((MT, NO, 4), float32)
        m = cuda.local.array((MT, 2), float32)  # per m-tile, the lane's rows g and g + 8
        l = cuda.local.array((MT, 2), float32)  # noqa: E741 (the paper's name)
        for i in range(MT):
            lo, hi = row0 + 16 * i, row0 + 16 * i + 8  # this lane's two rows of m-tile i
            for kk in range(KS):  # Q's A fragments, kept in registers for the whole block
                c0 = kk * 8 + t
                qf[i, kk, 0] = q[bh, lo, c0] if lo < n_q else uint32(0)
                qf[i, kk, 1] = q[bh, hi, c0] if hi < n_q else uint32(0)
                qf[i, kk, 2] = q[bh, lo, c0 + 4] if lo < n_q else uint32(0)
                qf[i, kk, 3] = q[bh, hi, c0 + 4] if hi < n_q else uint32(0)
            for n in range(NO):
                for e in range(4):
                    acc[i, n, e] = ZERO
            for h in range(2):
                m[i, h] = NEG_INF
                l[i, h] = ZERO
        c = scale * LOG2E  # exp(scale x) = exp2(c x)
        block_last = min(rb * BLOCK_ROWS + BLOCK_ROWS, n_q) - 1
        n_keys = min(n_k, block_last + offset + 1) if causal else n_k
        n_tiles = (n_keys + KEYS - 1) // KEYS
        for it in range(n_tiles + 1):  # iteration it: copy tile it, compute tile it - 1
            cp_wait()  # this thread's copies of tile it - 1 have landed ...
            cuda.syncthreads()  # ... everyone's, and tile it - 2 (the buffer refilled next) is consumed
            if it < n_tiles:
                base = (it & 1) * KEYS
                j_first = it * KEYS
                for u in range(COPIES):  # 16-byte chunks of K and V rows, rows r_copy + u * ROW_STEP
                    r = r_copy + u * ROW_STEP
                    j = j_first + r
                    nbytes = 16 if j < n_k else 0  # past the end: zeros
                    jj = j if j < n_k else n_k - 1
                    at = (kv_row + jj) * W + w_copy  # K and V have one shape: one index for both
                    cp_async(ks, base + r, w_copy, k, at, nbytes)
                    cp_async(vs, base + r, w_copy, v, at, nbytes)
                cp_commit()
            if it == 0:
                continue
            j0 = (it - 1) * KEYS
            kb = ((it - 1) & 1) * KEYS  # the buffer holding tile it - 1
            # S = Q K^T (Algorithm 1 line 9 / FA2 line 8), 8 keys per mma column block
            for n in range(NS):
                for i in range(MT):
                    for e in range(4):
                        s[i, n, e] = ZERO
                for kk in range(0, KS, 2):  # one ldmatrix.x4 feeds two k-steps of every m-tile
                    b0, b1, b2, b3 = ldsm(ks, kb + n * 8 + (lane & 7), kk * 8 + (lane >> 3) * 4)
                    for i in range(MT):
                        e = mma(
                            qf[i, kk, 0], qf[i, kk, 1], qf[i, kk, 2], qf[i, kk, 3], b0, b1,
                            s[i, n, 0], s[i, n, 1], s[i, n, 2], s[i, n, 3],
                        )  # fmt: skip
                        e = mma(
                            qf[i, kk + 1, 0], qf[i, kk + 1, 1], qf[i, kk + 1, 2], qf[i, kk + 1, 3], b2, b3,
                            e[0], e[1], e[2], e[3],
                        )  # fmt: skip
                        for h in range(4):
                            s[i, n, h] = e[h]
            for i in range(MT):
                # mask (tail keys, causal), row max over this lane's keys then its 4-lane group
                lo = row0 + 16 * i
                masked = j0 + KEYS > n_k or (causal and j0 + KEYS - 1 > r0 + 16 * i + offset)
                x0 = NEG_INF
                x1 = NEG_INF
                for n in range(NS):
                    if masked:
                        for e in range(4):
                            key = j0 + n * 8 + 2 * t + (e & 1)
                            if key >= n_k or (causal and key > lo + 8 * (e >> 1) + offset):
                                s[i, n, e] = NEG_INF
                    x0 = max(x0, max(s[i, n, 0], s[i, n, 1]))
                    x1 = max(x1, max(s[i, n, 2], s[i, n, 3]))
                x0 = max(x0, shfl(x0, 1))
                x0 = max(x0, shfl(x0, 2))
                x1 = max(x1, shfl(x1, 1))
                x1 = max(x1, shfl(x1, 2))
                mn0 = max(m[i, 0], x0)
                mn1 = max(m[i, 1], x1)
                # m is kept in units of S; exp(scale (S - m)) = exp2(S c - m c), one FMA and one ex2
                base0 = mn0 * c if mn0 != NEG_INF else ZERO  # a row with no key yet: exp2(-inf - 0) = 0
                base1 = mn1 * c if mn1 != NEG_INF else ZERO
                alpha0 = ex2(m[i, 0] * c - base0)
                alpha1 = ex2(m[i, 1] * c - base1)
                m[i, 0] = mn0
                m[i, 1] = mn1
                l0 = l[i, 0] * alpha0
                l1 = l[i, 1] * alpha1
                for n in range(NS):  # P = exp(scale S - m) (FA2 line 9), row sums from the float32 values
                    s[i, n, 0] = ex2(s[i, n, 0] * c - base0)
                    s[i, n, 1] = ex2(s[i, n, 1] * c - base0)
                    s[i, n, 2] = ex2(s[i, n, 2] * c - base1)
                    s[i, n, 3] = ex2(s[i, n, 3] * c - base1)
                    l0 += s[i, n, 0] + s[i, n, 1]
                    l1 += s[i, n, 2] + s[i, n, 3]
                l[i, 0] = l0
                l[i, 1] = l1
                for n in range(NO):
                    acc[i, n, 0] *= alpha0
                    acc[i, n, 1] *= alpha0
                    acc[i, n, 2] *= alpha1
                    acc[i, n, 3] *= alpha1
            # O += P V (FA2 line 10): P rounded to 16 bits, S's C fragments are P's A fragments
            for kk in range(PK):
                for n in range(0, NO, 2):  # one ldmatrix.x4.trans feeds two 8-column blocks of O
                    jm = lane >> 3
                    b0, b1, b2, b3 = ldsm_t(
                        vs, kb + kk * 16 + (jm & 1) * 8 + (lane & 7), n * 4 + (jm >> 1) * 4
                    )
                    for i in range(MT):
                        a0 = pack(s[i, 2 * kk, 0], s[i, 2 * kk, 1])
                        a1 = pack(s[i, 2 * kk, 2], s[i, 2 * kk, 3])
                        a2 = pack(s[i, 2 * kk + 1, 0], s[i, 2 * kk + 1, 1])
                        a3 = pack(s[i, 2 * kk + 1, 2], s[i, 2 * kk + 1, 3])
                        e = mma(
                            a0, a1, a2, a3, b0, b1, acc[i, n, 0], acc[i, n, 1], acc[i, n, 2], acc[i, n, 3]
                        )
                        for h in range(4):
                            acc[i, n, h] = e[h]
                        e = mma(
                            a0, a1, a2, a3, b2, b3,
                            acc[i, n + 1, 0], acc[i, n + 1, 1], acc[i, n + 1, 2], acc[i, n + 1, 3],
                        )  # fmt: skip
                        for h in range(4):
                            acc[i, n + 1, h] = e[h]
        for i in range(MT):
            # the row sums: each lane held a quarter of every tile's weights
            l0 = l[i, 0]
            l1 = l[i, 1]
            l0 += shfl(l0, 1)
            l0 += shfl(l0, 2)
            l1 += shfl(l1, 1)
            l1 += shfl(l1, 2)
            inv0 = ONE / l0 if l0 > ZERO else ZERO  # a row that sees no key: o = 0, lse = -inf
            inv1 = ONE / l1 if l1 > ZERO else ZERO
            lo, hi = row0 + 16 * i, row0 + 16 * i + 8
            for n in range(NO):
                w0 = n * 4 + t
                word0 = pack(acc[i, n, 0] * inv0, acc[i, n, 1] * inv0)
                word1 = pack(acc[i, n, 2] * inv1, acc[i, n, 3] * inv1)
                if lo < n_q:
                    o[bh, lo, w0] = word0
                if hi < n_q:
                    o[bh, hi, w0] = word1
            if t == 0:
                if lo < n_q:
                    lse[bh, lo] = (m[i, 0] * c + math.log2(l0)) * LN2 if l0 > ZERO else NEG_INF
                if hi < n_q:
                    lse[bh, hi] = (m[i, 1] * c + math.log2(l1)) * LN2 if l1 > ZERO else NEG_INF

    return flash_tc


@cache
def compiled(d: int, causal: bool, dtype: str, m_tiles: int | None = None):
    """:func:`kernel_source` compiled by ``numba.cuda.jit`` for the argument types of the first call.

    No fast math: it would let the compiler assume no infinities, and ``-inf`` marks masked scores.
    """
    return cuda.jit(kernel_source(d, causal, dtype, m_tiles))


def block_rows(d: int, causal: bool, m_tiles: int | None = None) -> int:
    """Query rows per block: 16 per m-tile, ``m_tiles`` (default :data:`M_TILES`) per warp."""
    return 16 * WARPS * (M_TILES[d, causal] if m_tiles is None else m_tiles)


def launch(q, k, v, o, lse, scale: float, causal: bool, dtype: str, m_tiles: int | None = None) -> None:
    """Run the kernel on 3-d uint32 ``q, k, v (BH, N, d/2)`` into ``o``, ``lse``: device arrays or CUDA
    tensors on a GPU; NumPy arrays in the simulator (through ``_numba.simulate``, one block at a time);
    ``m_tiles`` per warp as in :func:`kernel_source`."""
    bh, n_q, w = q.shape
    n_k = k.shape[1]
    if not n_q:
        return
    grid = (math.ceil(n_q / block_rows(2 * w, causal, m_tiles)), bh)
    k, v = (x.reshape(x.size) for x in (k, v))  # flat (contiguous): the kernel's copy index
    args = (q, k, v, o, lse, n_q, n_k, np.float32(scale), n_k - n_q)
    if device.MODE == "gpu":
        compiled(2 * w, causal, dtype, m_tiles)[grid, 32 * WARPS](*args)
    else:
        simulate(kernel_source(2 * w, causal, dtype, m_tiles), grid, (32 * WARPS,), args)


def _is_torch_cuda(x) -> bool:
    return hasattr(x, "is_cuda") and bool(getattr(x, "is_cuda", False))


def flash_attention_tc(q, k, v, *, causal=False, scale=None, return_lse=False, dtype=None, m_tiles=None):
    """FlashAttention-2 forward on tensor cores: ``o (..., N_q, d)`` (and ``lse (..., N_q)``).

    NumPy arrays (simulator or GPU) are rounded to ``dtype`` (``"bfloat16"`` or ``"float16"``;
    default: float16 arrays stay float16, anything else becomes bfloat16); ``o`` comes back float32
    holding 16-bit values. Torch CUDA tensors must be bfloat16 or float16 (``dtype`` is theirs) and
    ``o`` is a tensor of that dtype. d in {64, 128}, any N_q, N_k; ``causal`` is bottom-right;
    ``m_tiles``: 16-row m-tiles per warp (default :data:`M_TILES`).
    """
    if _is_torch_cuda(q):
        return _torch_tc(q, k, v, causal, scale, return_lse, m_tiles)
    from flashlab.inputs import attention_inputs

    q, k, v = (np.asarray(x) for x in (q, k, v))
    if dtype is None:
        dtype = "float16" if q.dtype == np.float16 else "bfloat16"
    if dtype not in DTYPES16:
        raise ValueError(f"dtype: got {dtype!r}; use one of {DTYPES16}")
    a = attention_inputs(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), scale)
    d = a.q.shape[-1]
    if d not in HEAD_DIMS or a.v.shape[-1] != d:
        raise ValueError(f"q, v: head dims must both be one of {HEAD_DIMS}, got d={d}, d_v={a.v.shape[-1]}")
    lead, n_q = a.q.shape[:-2], a.q.shape[-2]
    words = [
        np.ascontiguousarray(to_bits(x, dtype).reshape(-1, x.shape[-2], d)).view(np.uint32)
        for x in (a.q, a.k, a.v)
    ]
    o = np.zeros_like(words[0])
    lse = np.zeros(words[0].shape[:2], np.float32)
    if device.MODE == "gpu":
        dev = [cuda.to_device(x) for x in (*words, o, lse)]
        launch(*dev, a.scale, causal, dtype, m_tiles)
        o, lse = dev[3].copy_to_host(), dev[4].copy_to_host()
    else:
        launch(*words, o, lse, a.scale, causal, dtype, m_tiles)
    o = from_bits(o.view(np.uint16), dtype).reshape(lead + (n_q, d))
    lse = lse.reshape(lead + (n_q,))
    return (o, lse) if return_lse else o


def _torch_launch(q3, k3, v3, o, lse, scale: float, causal: bool, m_tiles=None) -> None:
    """Launch on contiguous 3-d bf16/fp16 CUDA tensors ``q3, k3, v3, o`` and float32 ``lse``, in place."""
    import torch

    def words(x):
        return cuda.as_cuda_array(x.view(torch.int32)).view(np.uint32)

    dtype = "bfloat16" if q3.dtype == torch.bfloat16 else "float16"
    launch(words(q3), words(k3), words(v3), words(o), cuda.as_cuda_array(lse), scale, causal, dtype, m_tiles)


def _torch_tc(q, k, v, causal, scale, return_lse, m_tiles):
    """Torch CUDA tensors (bf16/fp16) in place, viewed as uint32 pairs."""
    import torch

    names = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if q.dtype not in names:
        raise ValueError(f"q: torch tensors must be bfloat16 or float16, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if not _is_torch_cuda(x) or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name}: must be a {q.dtype} CUDA tensor on {q.device} like q")
    d = q.shape[-1]
    if d not in HEAD_DIMS or v.shape[-1] != d or k.shape[-1] != d:
        raise ValueError(
            f"q, k, v: head dims must all be one of {HEAD_DIMS}, "
            f"got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}"
        )
    lead, n_q = tuple(q.shape[:-2]), q.shape[-2]
    q3, k3, v3 = (x.reshape(-1, x.shape[-2], d).contiguous() for x in (q, k, v))
    if k3.shape[0] != q3.shape[0]:
        raise ValueError(f"k: leading dims {tuple(k.shape[:-2])} must equal q's {lead}")
    o = torch.empty_like(q3)
    lse = torch.empty(q3.shape[:2], dtype=torch.float32, device=q.device)
    _torch_launch(q3, k3, v3, o, lse, 1 / math.sqrt(d) if scale is None else float(scale), causal, m_tiles)
    o, lse = o.reshape(lead + (n_q, d)), lse.reshape(lead + (n_q,))
    return (o, lse) if return_lse else o
