"""Rounding to bf16, fp16, TF32, and the precision lesson's errors against their derived bounds."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashlab.precision import (
    DTYPES16,
    FORMATS,
    emulated_attention,
    format_errors,
    from_bits,
    round_to,
    tensor_core_bound,
    to_bits,
)
from flashlab.tolerance import unit_roundoff

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(st.lists(finite32, min_size=1, max_size=50), st.sampled_from(["tfloat32", "bfloat16"]))
def test_rounding_is_within_unit_roundoff(xs, fmt):
    x = np.array(xs, np.float32)
    r = round_to(x, fmt).astype(np.float64)
    normal = np.abs(x) >= np.finfo(np.float32).tiny
    err = np.abs(r - x)[normal & np.isfinite(r)]
    assert np.all(err <= unit_roundoff(fmt) * np.abs(x.astype(np.float64))[normal & np.isfinite(r)])


def test_ties_go_to_even():
    one = np.float32(1.0)
    assert round_to(one + np.float32(2.0**-8), "bfloat16") == one  # halfway, 1.0 is even
    assert round_to(one + np.float32(3 * 2.0**-8), "bfloat16") == one + np.float32(2.0**-6)
    assert round_to(one + np.float32(2.0**-11), "tfloat32") == one


@given(st.lists(st.floats(-65504, 65504, width=32), min_size=1, max_size=50))
def test_float16_matches_numpy_and_bits_round_trip(xs):
    x = np.array(xs, np.float32)
    assert np.array_equal(round_to(x, "float16"), x.astype(np.float16).astype(np.float32))
    for dtype in DTYPES16:
        bits = to_bits(x, dtype)
        assert np.array_equal(to_bits(from_bits(bits, dtype), dtype), bits)


@given(st.integers(1, 80), st.integers(1, 600), st.booleans(), st.integers(0, 2**32 - 1))
def test_every_format_within_its_bound(n_q, n_k, causal, seed):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((n_q, 16)), rng.standard_normal((n_k, 16)), rng.standard_normal((n_k, 16))
    if causal and n_q > n_k:
        n_q = n_k
        q = q[:n_q]
    ref = emulated_attention(q, k, v, "float64", causal=causal)
    for fmt in FORMATS[1:]:
        o = emulated_attention(q, k, v, fmt, causal=causal)
        assert np.all(np.isfinite(o))
        assert np.abs(o - ref).max() <= tensor_core_bound(q, k, v, fmt).atol


def test_bf16_is_coarser_than_fp16_and_rounding_p_costs_little():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((256, 64)) for _ in range(3))
    e = format_errors(q, k, v)
    assert e["float32"] < e["float16"] < e["bfloat16"]
    for fmt in DTYPES16:  # P in [0, 1] rounded to the format adds at most u max|v| per weight sum
        assert abs(e[fmt] - e[f"{fmt}, P in float32"]) <= 2 * unit_roundoff(fmt) * np.abs(v).max()


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        round_to(np.ones(2), "float8")
