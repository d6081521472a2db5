"""Tensor-core instructions for numba.cuda kernels, written as inline PTX, and their emulation.

numba-cuda is in maintenance mode and has no ``wmma``/``mma`` API: inline PTX, emitted by a numba
``@intrinsic`` through llvmlite's ``ir.InlineAsm``, is its only path to the tensor cores. Every such
instruction the course uses lives in this one module, so moving to another toolchain is one file.

On a GPU (``flashlab.device.MODE == "gpu"``) the public names below are those intrinsics. In numba's
CUDA simulator, which runs every thread of a block as a Python thread, the same names are Python
functions with the exact per-lane behaviour the PTX ISA specifies: each lane hands its registers to
an exchange shared by the 32 lanes of its warp, the last lane to arrive computes the warp's result,
and each lane takes its own registers back. So one kernel source runs in both places.

``mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`` computes ``D = A B + C`` for a
warp: A is 16x16, B 16x8, C and D 16x8. With ``g = lane >> 2`` (the group) and ``t = lane & 3``
(the thread in the group), lane ``lane`` holds (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
floating point type"):

- A: 4 registers of 32 bits, two 16-bit elements each, elements ``a0..a7`` (register ``i // 2``,
  ``i % 2`` the low/high half): row ``g`` for ``a0, a1, a4, a5``, row ``g + 8`` otherwise;
  column ``2t + (i & 1)``, plus 8 for ``i >= 4``.
- B: 2 registers, elements ``b0..b3``: row ``2t + (i & 1)``, plus 8 for ``i >= 2``; column ``g``.
- C, D: 4 float32 registers ``c0..c3``: row ``g``, plus 8 for ``i >= 2``; column ``2t + (i & 1)``.

:func:`a_index`, :func:`b_index` and :func:`c_index` state these maps once; the emulation, the NumPy
reference in the tests and the pictures in :mod:`flashlab.plots.fragments` all use them.

Besides the tensor-core instructions: ``ldmatrix`` (shared memory to fragments), ``shfl.sync`` (a
register from another lane), ``cp.async`` (global to shared memory with no register in between, so
a tile's copy runs while the previous tile is computed; ``commit_group`` / ``wait_group``) and
``ex2.approx`` (the SFU's ``2**x``, one instruction).
"""

from __future__ import annotations

import threading
import weakref
from functools import cache

import numpy as np

from flashlab import device
from flashlab.precision import DTYPES16, from_bits, to_bits

M, N, K = 16, 8, 16  # the mma shape: A is M x K, B is K x N, C and D are M x N
WARP = 32
#: 32-bit registers per lane for each operand
REGISTERS = {"a": 4, "b": 2, "c": 4}


# --------------------------------------------------------------------------------------------------
# The fragment layouts: (lane, element) -> (row, col), from the PTX ISA
# --------------------------------------------------------------------------------------------------


def a_index(lane: int, i: int) -> tuple[int, int]:
    """(row, col) in the 16x16 A of lane ``lane``'s element ``a_i`` (``i`` in 0..7; register i // 2)."""
    g, t = lane >> 2, lane & 3
    return g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)


def b_index(lane: int, i: int) -> tuple[int, int]:
    """(row, col) in the 16x8 B of lane ``lane``'s element ``b_i`` (``i`` in 0..3; register i // 2)."""
    g, t = lane >> 2, lane & 3
    return 2 * t + (i & 1) + 8 * (i >> 1), g


def c_index(lane: int, i: int) -> tuple[int, int]:
    """(row, col) in the 16x8 C (and D) of lane ``lane``'s float32 register ``c_i`` (``i`` in 0..3)."""
    g, t = lane >> 2, lane & 3
    return g + 8 * (i >> 1), 2 * t + (i & 1)


INDEX = {"a": a_index, "b": b_index, "c": c_index}
SHAPES = {"a": (M, K), "b": (K, N), "c": (M, N)}


def index_table(which: str) -> tuple[np.ndarray, np.ndarray]:
    """``rows, cols``, each ``(32, elements)``: where every lane's elements of ``which`` sit."""
    if which not in INDEX:
        raise ValueError(f"which: got {which!r}; use 'a', 'b' or 'c'")
    elements = REGISTERS[which] * (2 if which != "c" else 1)
    table = np.array([[INDEX[which](lane, i) for i in range(elements)] for lane in range(WARP)])
    return table[..., 0], table[..., 1]


_TABLES = {which: index_table(which) for which in INDEX}


def fragments(matrix, which: str, dtype: str = "bfloat16") -> np.ndarray:
    """Every lane's registers of ``matrix``: ``(32, 4)`` uint32 for ``"a"``, ``(32, 2)`` for ``"b"``
    (16-bit values of ``dtype``, element ``2r`` in the low half of register ``r``), ``(32, 4)`` float32
    for ``"c"``."""
    m = np.asarray(matrix)
    if m.shape != SHAPES[which]:
        raise ValueError(f"matrix: {which} must be {SHAPES[which]}, got {m.shape}")
    rows, cols = _TABLES[which]
    if which == "c":
        return m.astype(np.float32)[rows, cols]
    bits = to_bits(m, dtype)[rows, cols].astype(np.uint32)
    return bits[:, 0::2] | (bits[:, 1::2] << 16)


def matrix(regs, which: str, dtype: str = "bfloat16") -> np.ndarray:
    """The float32 matrix the warp's registers ``regs`` (as :func:`fragments` returns) hold."""
    regs = np.asarray(regs)
    rows, cols = _TABLES[which]
    out = np.zeros(SHAPES[which], np.float32)
    if which == "c":
        out[rows, cols] = regs.astype(np.float32)
        return out
    r = regs.astype(np.uint32)
    halves = np.stack([r & 0xFFFF, r >> 16], axis=-1).reshape(WARP, -1)
    out[rows, cols] = from_bits(halves.astype(np.uint16), dtype)
    return out


# --------------------------------------------------------------------------------------------------
# The warp exchange of the simulator
# --------------------------------------------------------------------------------------------------


class _Warp:
    """32 lanes meet here: each leaves its registers, the last to arrive runs ``combine``."""

    def __init__(self):
        self.slots = [None] * WARP
        self.combine = None
        self.out = None
        self.barrier = threading.Barrier(WARP, action=self._run, timeout=120)

    def _run(self):
        self.out = self.combine(self.slots)


_WARPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # launch (block manager) -> warps
_LOCK = threading.Lock()


def _exchange(payload, combine):
    """Hand ``payload`` to this lane's warp, wait for all 32 lanes, return ``combine(slots)[lane]``.

    Must run inside a simulated kernel whose block has a multiple of 32 threads, all calling it.
    """
    thread = threading.current_thread()
    if not hasattr(thread, "threadIdx"):
        raise RuntimeError("flashlab.cuda.ptx: warp instructions run only inside a simulated kernel")
    manager = thread._manager  # one per launch: warps of an aborted launch are never reused
    lane, warp_id = thread.thread_id % WARP, thread.thread_id // WARP
    with _LOCK:
        warps = _WARPS.setdefault(manager, {})
        warp = warps.setdefault((tuple(thread.blockIdx), warp_id), _Warp())
    warp.slots[lane] = payload
    warp.combine = combine
    warp.barrier.wait()
    return warp.out[lane]


def _halves(word) -> tuple[int, int]:
    w = int(word)
    return w & 0xFFFF, w >> 16


def _word(lo: int, hi: int) -> np.uint32:
    return np.uint32(int(lo) | (int(hi) << 16))


# --------------------------------------------------------------------------------------------------
# Emulations (the simulator's implementation; their docstrings describe the instructions)
# --------------------------------------------------------------------------------------------------


def _mma_combine(dtype):
    def combine(slots):
        a = matrix([s[0:4] for s in slots], "a", dtype)
        b = matrix([s[4:6] for s in slots], "b", dtype)
        c = matrix([s[6:10] for s in slots], "c")
        d = a @ b + c  # float32 products of 16-bit values, float32 sums
        rows, cols = _TABLES["c"]
        return [tuple(np.float32(x) for x in lane) for lane in d[rows, cols]]

    return combine


_COMBINE = {dtype: _mma_combine(dtype) for dtype in DTYPES16}


def emulated_mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """``mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32``: ``D = A B + C`` for the warp.

    Each lane passes its A registers ``a0..a3`` (uint32, two bf16 each), B registers ``b0, b1`` and
    float32 accumulators ``c0..c3`` in the layout of the module docstring (:func:`a_index`,
    :func:`b_index`, :func:`c_index`), and gets its four float32 registers of D back as a tuple.
    All 32 lanes of the warp must call it together (``.sync.aligned``).
    """
    return _exchange((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), _COMBINE["bfloat16"])


def emulated_mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32``: as :func:`emulated_mma_bf16` with fp16
    inputs (two IEEE half floats per register), float32 accumulation."""
    return _exchange((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), _COMBINE["float16"])


def emulated_pack_bf16x2(lo, hi):
    """``cvt.rn.bf16x2.f32 d, hi, lo``: two float32 values rounded to bf16 (nearest even) in one
    32-bit register, ``lo`` in the low half (the element with the smaller column index)."""
    return _word(to_bits(lo, "bfloat16"), to_bits(hi, "bfloat16"))


def emulated_pack_f16x2(lo, hi):
    """``cvt.rn.f16x2.f32 d, hi, lo``: as :func:`emulated_pack_bf16x2`, rounding to fp16."""
    return _word(to_bits(lo, "float16"), to_bits(hi, "float16"))


def _ldmatrix_combine(trans):
    def combine(rows):  # rows[l]: the four 32-bit words (eight 16-bit elements) lane l points at
        out = []
        for lane in range(WARP):
            g, t = lane >> 2, lane & 3
            regs = []
            for j in range(4):  # matrix j is rows[8 j .. 8 j + 7]
                if trans:  # elements (2t, g) and (2t + 1, g) of matrix j
                    lo = _halves(rows[8 * j + 2 * t][g >> 1])[g & 1]
                    hi = _halves(rows[8 * j + 2 * t + 1][g >> 1])[g & 1]
                    regs.append(_word(lo, hi))
                else:  # elements (g, 2t) and (g, 2t + 1): one word of row g
                    regs.append(np.uint32(rows[8 * j + g][t]))
            out.append(tuple(regs))
        return out

    return combine


_LDMATRIX = {False: _ldmatrix_combine(False), True: _ldmatrix_combine(True)}


def emulated_ldmatrix_x4(smem, row, col):
    """``ldmatrix.sync.aligned.m8n8.x4.shared.b16``: four 8x8 matrices of 16-bit elements from shared
    memory into four registers per lane.

    ``smem`` is a 2-d uint32 shared array (two 16-bit elements per word); lane ``l`` points at the
    8-element row starting at word ``smem[row, col]`` (16-byte aligned): lanes ``8j .. 8j + 7`` give
    the rows of matrix ``j``. Lane ``l`` receives, in register ``j``, elements ``(l >> 2, 2 (l & 3))``
    and ``(l >> 2, 2 (l & 3) + 1)`` of matrix ``j``: the A/B fragment layout of ``mma``.
    """
    return _exchange(tuple(smem[row, col + w] for w in range(4)), _LDMATRIX[False])


def emulated_ldmatrix_x4_trans(smem, row, col):
    """``ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16``: as :func:`emulated_ldmatrix_x4`, each
    matrix transposed: register ``j`` of lane ``l`` holds elements ``(2 (l & 3), l >> 2)`` and
    ``(2 (l & 3) + 1, l >> 2)`` of matrix ``j``, the B fragment of a row-major K x N tile."""
    return _exchange(tuple(smem[row, col + w] for w in range(4)), _LDMATRIX[True])


def emulated_shfl_xor(value, lane_mask):
    """``shfl.sync.bfly.b32 d, value, lane_mask, 0x1f, 0xffffffff``: the ``value`` of lane
    ``lane ^ lane_mask``, all 32 lanes taking part."""
    return _exchange((value, lane_mask), lambda s: [s[lane ^ s[lane][1]][0] for lane in range(WARP)])


#: what a ``cp.async`` destination holds until the wait: NaN in both halves, in bf16 and in fp16
POISON = np.uint32(0x7FC07FC0)


def emulated_cp_async16(dst, row, col, src, index, nbytes):
    """``cp.async.cg.shared.global [dst], [src], 16, nbytes``: copy 16 bytes (4 uint32 words) from
    global ``src[index:index + 4]`` (a 1-d array) to shared ``dst[row, col:col + 4]`` without passing
    through registers; ``nbytes = 0`` writes zeros instead (a tile row past the end). Both addresses
    16-byte aligned. The copy lands only by :func:`emulated_cp_async_wait_all`: until then the
    destination holds NaN, so a kernel that reads it too early, or refills a buffer still being read,
    computes NaN.
    """
    words = [src[index + w] if nbytes else np.uint32(0) for w in range(4)]
    for w in range(4):
        dst[row, col + w] = POISON
    pending = threading.current_thread().__dict__.setdefault("cp_async", [])
    pending.append((dst, row, col, words))


def emulated_cp_async_commit():
    """``cp.async.commit_group``: close this thread's group of outstanding copies."""


def emulated_cp_async_wait_all():
    """``cp.async.wait_group 0``: wait until every copy this thread issued has landed. Other threads'
    copies are visible only after a barrier as well (``syncthreads``)."""
    for dst, row, col, words in threading.current_thread().__dict__.pop("cp_async", []):
        for w in range(4):
            dst[row, col + w] = words[w]


def emulated_ex2(x):
    """``ex2.approx.ftz.f32``: ``2**x`` in float32 (``ex2(-inf) = 0``); the hardware's result is within
    2 ulp of it and flushes subnormals to zero."""
    y = np.float32(np.exp2(np.float32(x)))
    return y if y >= np.finfo(np.float32).tiny else np.float32(0.0)


# 16-byte global loads and their unpacking (the split-KV decode kernel, flashlab.cuda.decode):
# numba emits one scalar load per element; one ``LDG.E.128`` per lane moves 16 bytes, so a warp reads
# 512 bytes per instruction. The loaded words are then reinterpreted: two fp16 halves, or one float32.

_ZERO_WORDS = (np.uint32(0),) * 4


def emulated_ld_global_v4(arr, i0, i1, i2, valid):
    """``@p ld.global.nc.v4.u32``: the 16 bytes that start at element ``arr[i0, i1, i2]`` of a 3-d
    float32 or float16 global array (4 or 8 elements of its last axis, 16-byte aligned) as four
    uint32 words, the first element in the low bytes of word 0; four zeros, and no access, where
    ``valid`` is false. Through the read-only (non-coherent) cache: ``arr`` must not be written by the
    kernel."""
    if not valid:
        return _ZERO_WORDS
    first = arr[i0, i1, i2]  # element by element, so a counting array counts each element once
    elements = [first] + [arr[i0, i1, i2 + e] for e in range(1, 16 // first.itemsize)]
    return tuple(np.array(elements).view(np.uint32))


def emulated_unpack_f16x2(word):
    """``mov.b32 {lo, hi}, word; cvt.f32.f16``: the two fp16 halves of ``word`` as float32 (exact),
    the low half (the element with the smaller index) first."""
    lo, hi = from_bits(np.array(_halves(word), np.uint16), "float16")
    return np.float32(lo), np.float32(hi)


def emulated_as_f32(word):
    """The bits of the 32-bit ``word`` as a float32 (a bit cast, no instruction)."""
    return np.uint32(word).view(np.float32)


# --------------------------------------------------------------------------------------------------
# The inline-PTX intrinsics (GPU)
# --------------------------------------------------------------------------------------------------

#: the PTX each intrinsic emits (operands ``$0..``: outputs first, then inputs)
PTX = {
    "mma_bf16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
    "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
    "mma_f16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
    "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
    "pack_bf16x2": "cvt.rn.bf16x2.f32 $0, $2, $1;",
    "pack_f16x2": "cvt.rn.f16x2.f32 $0, $2, $1;",
    "ldmatrix_x4": "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {$0, $1, $2, $3}, [$4];",
    "ldmatrix_x4_trans": "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {$0, $1, $2, $3}, [$4];",
    "shfl_xor": "shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;",
    "cp_async16": "{ .reg .u64 s; cvta.to.global.u64 s, $1; cp.async.cg.shared.global [$0], [s], 16, $2; }",
    "cp_async_commit": "cp.async.commit_group;",
    "cp_async_wait_all": "cp.async.wait_group 0;",
    "ex2": "ex2.approx.ftz.f32 $0, $1;",
    "ld_global_v4": "{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; "
    "mov.b32 $3, 0; @p ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4]; }",
    "unpack_f16x2": "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
}


@cache
def _intrinsics() -> dict:
    """Build the numba intrinsics (imports numba's CUDA target: GPU mode only)."""
    from llvmlite import ir
    from numba.cuda import cgutils, types
    from numba.cuda.extending import intrinsic

    i32, f32 = ir.IntType(32), ir.FloatType()

    def asm(builder, ret, args, text, constraints, side_effect=False):
        fnty = ir.FunctionType(ret, [a.type for a in args])
        return builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=side_effect), args)

    def element(context, builder, aryty, ary, indices):
        ary = context.make_array(aryty)(context, builder, ary)
        return cgutils.get_item_pointer(context, builder, aryty, ary, indices, wraparound=False)

    def pointer(context, builder, aryty, ary, indices):
        return builder.ptrtoint(element(context, builder, aryty, ary, indices), ir.IntType(64))

    def shared_address(context, builder, aryty, ary, indices):
        """The 32-bit shared-memory address of an element of a shared array: the generic pointer cast
        back to the shared address space, so that the index arithmetic stays 32-bit and needs no
        ``cvta`` per instruction."""
        ptr = element(context, builder, aryty, ary, indices)
        return builder.ptrtoint(builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 3)), i32)

    def four(context, builder, sig, res):
        vals = [builder.extract_value(res, i) for i in range(4)]
        return context.make_tuple(builder, sig.return_type, vals)

    def make_mma(name):
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            sig = types.UniTuple(types.float32, 4)(*([types.uint32] * 6 + [types.float32] * 4))

            def codegen(context, builder, sig, args):
                ret = ir.LiteralStructType([f32] * 4)
                constraints = "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f"
                return four(context, builder, sig, asm(builder, ret, args, PTX[name], constraints))

            return sig, codegen

        return intrinsic(mma)

    def make_pack(name):
        def pack(typingctx, lo, hi):
            sig = types.uint32(types.float32, types.float32)

            def codegen(context, builder, sig, args):
                return asm(builder, i32, args, PTX[name], "=r,f,f")

            return sig, codegen

        return intrinsic(pack)

    def make_ldmatrix(name):
        def ldmatrix(typingctx, smem, row, col):
            sig = types.UniTuple(types.uint32, 4)(smem, types.intp, types.intp)

            def codegen(context, builder, sig, args):
                addr = shared_address(context, builder, sig.args[0], args[0], args[1:])
                ret = ir.LiteralStructType([i32] * 4)
                res = asm(builder, ret, [addr], PTX[name], "=r,=r,=r,=r,r,~{memory}", side_effect=True)
                return four(context, builder, sig, res)

            return sig, codegen

        return intrinsic(ldmatrix)

    def shfl_xor(typingctx, value, lane_mask):
        sig = types.float32(types.float32, types.int32)

        def codegen(context, builder, sig, args):
            return asm(builder, f32, args, PTX["shfl_xor"], "=f,f,r", side_effect=True)

        return sig, codegen

    def cp_async16(typingctx, dst, row, col, src, index, nbytes):
        sig = types.void(dst, types.intp, types.intp, src, types.intp, types.int32)

        def codegen(context, builder, sig, args):
            d = shared_address(context, builder, sig.args[0], args[0], args[1:3])
            s = pointer(context, builder, sig.args[3], args[3], args[4:5])
            asm(builder, ir.VoidType(), [d, s, args[5]], PTX["cp_async16"], "r,l,r,~{memory}", True)
            return context.get_dummy_value()

        return sig, codegen

    def make_fence(name):
        def fence(typingctx):
            def codegen(context, builder, sig, args):
                asm(builder, ir.VoidType(), [], PTX[name], "~{memory}", side_effect=True)
                return context.get_dummy_value()

            return types.void(), codegen

        return intrinsic(fence)

    def ex2(typingctx, x):
        def codegen(context, builder, sig, args):
            return asm(builder, f32, args, PTX["ex2"], "=f,f")

        return types.float32(types.float32), codegen

    def ld_global_v4(typingctx, arr, i0, i1, i2, valid):
        sig = types.UniTuple(types.uint32, 4)(arr, types.intp, types.intp, types.intp, types.boolean)

        def codegen(context, builder, sig, args):
            ops = [pointer(context, builder, sig.args[0], args[0], args[1:4]), builder.zext(args[4], i32)]
            ret = ir.LiteralStructType([i32] * 4)
            return four(context, builder, sig, asm(builder, ret, ops, PTX["ld_global_v4"], "=r,=r,=r,=r,l,r"))

        return sig, codegen

    def unpack_f16x2(typingctx, word):
        sig = types.UniTuple(types.float32, 2)(types.uint32)

        def codegen(context, builder, sig, args):
            res = asm(builder, ir.LiteralStructType([f32] * 2), args, PTX["unpack_f16x2"], "=f,=f,r")
            halves = [builder.extract_value(res, h) for h in range(2)]
            return context.make_tuple(builder, sig.return_type, halves)

        return sig, codegen

    def as_f32(typingctx, word):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], f32)

        return types.float32(types.uint32), codegen

    built = {
        "mma_bf16": make_mma("mma_bf16"),
        "mma_f16": make_mma("mma_f16"),
        "pack_bf16x2": make_pack("pack_bf16x2"),
        "pack_f16x2": make_pack("pack_f16x2"),
        "ldmatrix_x4": make_ldmatrix("ldmatrix_x4"),
        "ldmatrix_x4_trans": make_ldmatrix("ldmatrix_x4_trans"),
        "shfl_xor": intrinsic(shfl_xor),
        "cp_async16": intrinsic(cp_async16),
        "cp_async_commit": make_fence("cp_async_commit"),
        "cp_async_wait_all": make_fence("cp_async_wait_all"),
        "ex2": intrinsic(ex2),
        "ld_global_v4": intrinsic(ld_global_v4),
        "unpack_f16x2": intrinsic(unpack_f16x2),
        "as_f32": intrinsic(as_f32),
    }
    for name, fn in built.items():
        fn.__doc__ = _EMULATED[name].__doc__  # the instruction and its layout, stated once
    return built


_EMULATED = {
    "mma_bf16": emulated_mma_bf16,
    "mma_f16": emulated_mma_f16,
    "pack_bf16x2": emulated_pack_bf16x2,
    "pack_f16x2": emulated_pack_f16x2,
    "ldmatrix_x4": emulated_ldmatrix_x4,
    "ldmatrix_x4_trans": emulated_ldmatrix_x4_trans,
    "shfl_xor": emulated_shfl_xor,
    "cp_async16": emulated_cp_async16,
    "cp_async_commit": emulated_cp_async_commit,
    "cp_async_wait_all": emulated_cp_async_wait_all,
    "ex2": emulated_ex2,
    "ld_global_v4": emulated_ld_global_v4,
    "unpack_f16x2": emulated_unpack_f16x2,
    "as_f32": emulated_as_f32,
}


def for_target(target: str) -> dict:
    """Every instruction by name, as a kernel compiled for ``target`` calls it: ``"gpu"``, the inline-PTX
    intrinsics (built once; needs numba's CUDA target, so a GPU); ``"sim"``, the emulations (any
    machine, also on a GPU machine when a kernel runs in the simulator, as the traffic counter does)."""
    if target == "sim":
        return _EMULATED
    if target != "gpu":
        raise ValueError(f"target: got {target!r}; use 'gpu' or 'sim'")
    return _intrinsics()


_IMPL = for_target("gpu" if device.MODE == "gpu" else "sim")

# the names kernels call: inline PTX on a GPU, the emulation above in the simulator
mma_bf16 = _IMPL["mma_bf16"]
mma_f16 = _IMPL["mma_f16"]
pack_bf16x2 = _IMPL["pack_bf16x2"]
pack_f16x2 = _IMPL["pack_f16x2"]
ldmatrix_x4 = _IMPL["ldmatrix_x4"]
ldmatrix_x4_trans = _IMPL["ldmatrix_x4_trans"]
shfl_xor = _IMPL["shfl_xor"]
cp_async16 = _IMPL["cp_async16"]
cp_async_commit = _IMPL["cp_async_commit"]
cp_async_wait_all = _IMPL["cp_async_wait_all"]
ex2 = _IMPL["ex2"]
ld_global_v4 = _IMPL["ld_global_v4"]
unpack_f16x2 = _IMPL["unpack_f16x2"]
as_f32 = _IMPL["as_f32"]

#: per input dtype: the mma and the pack a kernel uses
MMA = {"bfloat16": mma_bf16, "float16": mma_f16}
PACK = {"bfloat16": pack_bf16x2, "float16": pack_f16x2}
