"""The tensor-core instructions of flashlab.cuda.ptx, run on one warp (the emulation in the simulator,
inline PTX on a GPU) against NumPy references built from the PTX ISA's fragment layouts."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda, uint32

from flashlab import device
from flashlab.cuda import ptx
from flashlab.cuda._numba import simulate
from flashlab.precision import DTYPES16, round_to, to_bits
from flashlab.tolerance import Bound, check_close, gamma, unit_roundoff


@pytest.mark.parametrize("which", ["a", "b", "c"])
def test_every_element_is_held_by_exactly_one_lane_register(which):
    rows, cols = ptx.index_table(which)
    shape = ptx.SHAPES[which]
    held = np.zeros(shape, int)
    np.add.at(held, (rows, cols), 1)
    assert np.array_equal(held, np.ones(shape, int))


@given(st.sampled_from(DTYPES16), st.sampled_from("abc"), st.integers(0, 2**32 - 1))
def test_fragments_and_matrix_are_inverse(dtype, which, seed):
    m = np.random.default_rng(seed).standard_normal(ptx.SHAPES[which]).astype(np.float32)
    expected = m if which == "c" else round_to(m, dtype)
    assert np.array_equal(ptx.matrix(ptx.fragments(m, which, dtype), which, dtype), expected)


def _mma_kernel(dtype):
    mma = ptx.MMA[dtype]

    def kernel(a, b, c, d):
        lane = cuda.threadIdx.x
        r = mma(a[lane, 0], a[lane, 1], a[lane, 2], a[lane, 3], b[lane, 0], b[lane, 1],
                c[lane, 0], c[lane, 1], c[lane, 2], c[lane, 3])  # fmt: skip
        for i in range(4):
            d[lane, i] = r[i]

    return cuda.jit(kernel)


_MMA = {dtype: _mma_kernel(dtype) for dtype in DTYPES16}


@settings(max_examples=12)
@given(st.sampled_from(DTYPES16), st.integers(0, 2**32 - 1), st.sampled_from([1e-3, 1.0, 30.0]))
def test_mma_equals_numpy_reference(dtype, seed, size):
    rng = np.random.default_rng(seed)
    a, b, c = (size * rng.standard_normal(ptx.SHAPES[w]) for w in "abc")
    d = np.zeros((32, 4), np.float32)
    regs = [ptx.fragments(a, "a", dtype), ptx.fragments(b, "b", dtype), ptx.fragments(c, "c")]
    _MMA[dtype][1, 32](*regs, d)
    a16, b16, c32 = round_to(a, dtype), round_to(b, dtype), c.astype(np.float32)
    expected = a16.astype(np.float64) @ b16 + c32
    # 16-bit products are exact in float32; K + 1 terms summed, a tensor core may truncate (2 u)
    magnitude = np.abs(a16).astype(np.float64) @ np.abs(b16) + np.abs(c32)
    bound = Bound(float(gamma(ptx.K + 1, 2 * unit_roundoff("float32")) * magnitude.max()), "mma sum")
    check_close(ptx.matrix(d, "c"), expected, bound, what=f"mma {dtype}")


@cuda.jit
def _ldmatrix_kernel(tile, out, out_t):
    lane = cuda.threadIdx.x
    sm = cuda.shared.array((16, 12), uint32)  # 16 rows of 8 words (16 halves) + 4 words of padding
    for w in range(8):
        sm[lane % 16, w] = tile[lane % 16, w]
    cuda.syncthreads()
    r = ptx.ldmatrix_x4(sm, (lane & 7) + 8 * ((lane >> 3) & 1), 4 * (lane >> 4))
    rt = ptx.ldmatrix_x4_trans(sm, (lane & 7) + 8 * ((lane >> 3) & 1), 4 * (lane >> 4))
    for j in range(4):
        out[lane, j] = r[j]
        out_t[lane, j] = rt[j]


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=5)
def test_ldmatrix_gives_the_mma_fragments(seed):
    """Lanes 0-7, 8-15, 16-23, 24-31 point at the four 8x8 quadrants (top-left, bottom-left,
    top-right, bottom-right): x4 gives A's fragment; .trans gives B's for the left and right halves."""
    m = np.random.default_rng(seed).standard_normal((16, 16)).astype(np.float32)
    tile = np.ascontiguousarray(to_bits(m, "bfloat16")).view(np.uint32)  # (16, 8) words
    out, out_t = np.zeros((32, 4), np.uint32), np.zeros((32, 4), np.uint32)
    _ldmatrix_kernel[1, 32](tile, out, out_t)
    assert np.array_equal(out, ptx.fragments(m, "a"))
    assert np.array_equal(out_t[:, :2], ptx.fragments(m[:, :8], "b"))
    assert np.array_equal(out_t[:, 2:], ptx.fragments(m[:, 8:], "b"))


def _pack_kernel(dtype):
    pack = ptx.PACK[dtype]

    def kernel(x, out):
        lane = cuda.threadIdx.x
        out[lane] = pack(x[lane, 0], x[lane, 1])

    return cuda.jit(kernel)


@pytest.mark.parametrize("dtype", DTYPES16)
def test_pack_rounds_to_nearest_with_low_half_first(dtype):
    x = np.random.default_rng(3).standard_normal((32, 2)).astype(np.float32) * 100
    out = np.zeros(32, np.uint32)
    _pack_kernel(dtype)[1, 32](x, out)
    bits = to_bits(x, dtype).astype(np.uint32)
    assert np.array_equal(out, bits[:, 0] | (bits[:, 1] << 16))


@cuda.jit
def _shfl_kernel(x, out):
    lane = cuda.threadIdx.x
    out[lane, 0] = ptx.shfl_xor(x[lane], 1)
    out[lane, 1] = ptx.shfl_xor(x[lane], 2)


def test_shfl_xor_swaps_with_the_butterfly_partner():
    x = np.arange(32, dtype=np.float32) * 1.5
    out = np.zeros((32, 2), np.float32)
    _shfl_kernel[1, 32](x, out)
    lanes = np.arange(32)
    assert np.array_equal(out[:, 0], x[lanes ^ 1]) and np.array_equal(out[:, 1], x[lanes ^ 2])


def test_fragments_refuse_a_wrong_shape():
    with pytest.raises(ValueError, match="matrix: a must be"):
        ptx.fragments(np.zeros((8, 16)), "a")


def _cp_async_kernel(src, out, n_rows):
    """Each lane copies one 16-byte chunk of ``src`` (8 rows of 16 words, flat; rows past ``n_rows``:
    zero-fill) to shared memory, waits, and the block reads the tile back after a barrier."""
    lane = cuda.threadIdx.x
    sm = cuda.shared.array((8, 16), uint32, alignment=16)
    r, w = lane // 4, (lane % 4) * 4
    ptx.cp_async16(sm, r, w, src, (r if r < n_rows else 0) * 16 + w, 16 if r < n_rows else 0)
    ptx.cp_async_commit()
    ptx.cp_async_wait_all()
    cuda.syncthreads()
    for i in range(4):  # another lane's chunk: visible after the wait and the barrier
        out[(r + 1) % 8, w + i] = sm[(r + 1) % 8, w + i]


@pytest.mark.parametrize("n_rows", [8, 5])
def test_cp_async_copies_16_bytes_and_zero_fills(n_rows):
    src = np.random.default_rng(n_rows).integers(0, 2**32, 8 * 16, dtype=np.uint32)  # 8 rows, flat
    out = np.full((8, 16), 7, np.uint32)
    if device.MODE == "gpu":
        cuda.jit(_cp_async_kernel)[1, 32](src, out, n_rows)
    else:  # numba's simulator refuses aligned shared arrays; flashlab's block runner takes them
        simulate(_cp_async_kernel, (1,), (32,), (src, out, n_rows))
    assert np.array_equal(out[:n_rows], src.reshape(8, 16)[:n_rows]) and not out[n_rows:].any()


def test_cp_async_destination_is_poisoned_until_the_wait():
    dst, src = np.zeros((1, 4), np.uint32), np.arange(4, dtype=np.uint32)

    def lane():  # a thread of its own, as a simulated lane is
        ptx.emulated_cp_async16(dst, 0, 0, src, 0, 16)
        seen.append(dst.copy())
        ptx.emulated_cp_async_wait_all()

    seen = []
    thread = threading.Thread(target=lane)
    thread.start()
    thread.join()
    assert np.all(seen[0] == ptx.POISON) and np.array_equal(dst[0], src)


@cuda.jit
def _ex2_kernel(x, out):
    i = cuda.threadIdx.x
    out[i] = ptx.ex2(x[i])


def test_ex2_is_two_to_the_x_within_2_ulp():
    x = np.concatenate([np.linspace(-130, 20, 30), [-np.inf, 0.0]]).astype(np.float32)
    out = np.zeros(32, np.float32)
    _ex2_kernel[1, 32](x, out)
    ref = np.exp2(x.astype(np.float64))
    ref[ref < np.finfo(np.float32).tiny] = 0.0  # .ftz: subnormal results flush to zero
    assert np.all(np.abs(out - ref) <= 2 * np.spacing(ref.astype(np.float32)))


@cuda.jit
def _ld_f16_kernel(arr, out, n_valid):
    t = cuda.threadIdx.x
    words = ptx.ld_global_v4(arr, 0, t, 0, t < n_valid)
    for w in range(4):
        out[t, 2 * w], out[t, 2 * w + 1] = ptx.unpack_f16x2(words[w])


@cuda.jit
def _ld_f32_kernel(arr, out, n_valid):
    t = cuda.threadIdx.x
    words = ptx.ld_global_v4(arr, 0, t, 0, t < n_valid)
    for w in range(4):
        out[t, w] = ptx.as_f32(words[w])


@pytest.mark.parametrize(("dtype", "kernel"), [(np.float16, _ld_f16_kernel), (np.float32, _ld_f32_kernel)])
def test_ld_global_v4_reads_16_bytes_and_zero_fills(dtype, kernel):
    width = 16 // np.dtype(dtype).itemsize  # elements per 16-byte load
    arr = np.random.default_rng(0).standard_normal((1, 32, width)).astype(dtype)
    out = np.full((32, width), np.nan, np.float32)
    kernel[1, 32](arr, out, 27)
    assert np.array_equal(out[:27], arr[0, :27].astype(np.float32)) and not out[27:].any()


def test_ld_global_v4_words_are_the_bytes_in_memory_order():
    arr = np.arange(16, dtype=np.float16).reshape(1, 2, 8)
    words = ptx.emulated_ld_global_v4(arr, 0, 1, 0, True)
    assert np.array_equal(np.array(words, np.uint32), arr[0, 1].view(np.uint32))
    assert ptx.emulated_unpack_f16x2(words[0]) == (8.0, 9.0)  # the low half is the first element


def test_for_target_gives_emulations_in_the_simulator_and_refuses_other_targets():
    assert ptx.for_target("sim")["ex2"] is ptx.emulated_ex2
    with pytest.raises(ValueError, match="target: got 'cpu'"):
        ptx.for_target("cpu")
