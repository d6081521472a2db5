"""The tensor-core FlashAttention kernel against the float64 reference, within the bound
flashlab.precision.tensor_core_bound derives for its input format (in the simulator: one block of
4 warps, N <= 32; on a GPU the same tests run)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlab import naive_attention
from flashlab.cuda.tensor_core import TILE_KEYS, block_rows, flash_attention_tc
from flashlab.precision import DTYPES16, round_to, tensor_core_bound
from flashlab.tolerance import attention_bound, check_close


@settings(max_examples=4)
@given(
    n_q=st.integers(1, 32),
    n_k=st.integers(1, 32),
    d=st.sampled_from([64, 128]),
    causal=st.booleans(),
    dtype=st.sampled_from(DTYPES16),
    logit_size=st.sampled_from([0.5, 1.0, 4.0]),
    m_tiles=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_tensor_core_kernel_matches_float64(n_q, n_k, d, causal, dtype, logit_size, m_tiles, seed):
    rng = np.random.default_rng(seed)
    q = logit_size * rng.standard_normal((n_q, d))
    k, v = rng.standard_normal((n_k, d)), rng.standard_normal((n_k, d))
    check_against_float64(q, k, v, causal, dtype, m_tiles)


def check_against_float64(q, k, v, causal, dtype, m_tiles=None):
    q16, k16, v16 = (round_to(x, dtype).astype(np.float64) for x in (q, k, v))  # the kernel's inputs
    o, lse = flash_attention_tc(q, k, v, causal=causal, return_lse=True, dtype=dtype, m_tiles=m_tiles)
    o_ref, lse_ref = naive_attention(q16, k16, v16, causal=causal, return_lse=True)
    check_close(o, o_ref, tensor_core_bound(q16, k16, v16, dtype, rounded_inputs=True), what="o")
    check_close(o, naive_attention(q, k, v, causal=causal), tensor_core_bound(q, k, v, dtype), what="o")
    # lse: S and the softmax are float32 computations on the rounded inputs
    check_close(lse, lse_ref, attention_bound(q16, k16, v16, dtype="float32", quantity="lse"), what="lse")


@pytest.mark.parametrize(("d", "causal", "dtype"), [(64, True, "bfloat16"), (128, False, "float16")])
def test_several_tiles_reuse_both_buffers(d, causal, dtype):
    """Three K/V tiles, the last ragged: tile 2 is copied into the buffer tile 0 was computed from
    (the emulated cp.async poisons its destination until the wait, so an early read gives NaN)."""
    rng = np.random.default_rng(d)
    n_k = 2 * TILE_KEYS[d] + 5
    q = 2.0 * rng.standard_normal((40, d))  # N_q != N_k: causal rows see 94..133 keys
    k, v = rng.standard_normal((n_k, d)), rng.standard_normal((n_k, d))
    check_against_float64(q, k, v, causal, dtype)


@pytest.mark.parametrize("m_tiles", [1, 2])
def test_several_query_blocks_causal_in_reverse_order(m_tiles):
    """A query block and a ragged second (causal blocks run last-first), N_q < N_k, both m-tiles of
    a warp on rows that see different numbers of keys."""
    rng = np.random.default_rng(m_tiles)
    n_q = block_rows(64, True, m_tiles) + 3
    q = rng.standard_normal((n_q, 64))
    k, v = rng.standard_normal((n_q + 7, 64)), rng.standard_normal((n_q + 7, 64))
    check_against_float64(q, k, v, True, "bfloat16", m_tiles)


def test_leading_dims_and_float16_default():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 9, 64)).astype(np.float16) for _ in range(3))
    o = flash_attention_tc(q, k, v)
    ref = naive_attention(*(x.astype(np.float64) for x in (q, k, v)))
    assert o.shape == (1, 9, 64)
    check_close(o, ref, tensor_core_bound(q, k, v, "float16", rounded_inputs=True))


def test_refuses_unsupported_head_dim_and_dtype():
    x = np.zeros((4, 32))
    with pytest.raises(ValueError, match="head dims"):
        flash_attention_tc(x, x, x)
    y = np.zeros((4, 64))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention_tc(y, y, y, dtype="float32")
    with pytest.raises(ValueError, match="m_tiles"):
        flash_attention_tc(y, y, y, m_tiles=3)
