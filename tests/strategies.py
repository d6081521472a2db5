"""Hypothesis strategies and tolerances shared by the attention tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

# The tolerance is what assert_close checks, with no hidden factor. float64 results agree to ~1e-14.
# float32 needs more: the tests draw logits of several hundred (q spread 10, scale up to 3), and exp
# turns a score's rounding error |s| * 6e-8 into that relative error of its weight (seen: 4e-5).
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-12}


def assert_close(actual, expected, dtype, what="output"):
    """Relative agreement scaled by the largest magnitude (rows of zeros and -inf lse allowed)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    same_inf = np.isinf(expected) & (actual == expected)
    assert np.array_equal(np.isinf(actual), np.isinf(expected)), f"{what}: -inf pattern differs"
    a, e = np.where(same_inf, 0, actual), np.where(same_inf, 0, expected)
    assert np.all(np.isfinite(a)), f"{what}: non-finite values from finite input"
    scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
    err = float(np.max(np.abs(a - e), initial=0.0)) / scale
    assert err <= RTOL[np.dtype(dtype)], f"{what}: relative error {err:.3g} for {np.dtype(dtype)}"


@st.composite
def attention_problems(draw, max_n=300, max_d=64, dtypes=(np.float32, np.float64), max_batch=2):
    """(q, k, v, causal) with random N_q, N_k, d, d_v, leading dims, dtype and logit size."""
    dtype = draw(st.sampled_from(dtypes))
    n_q = draw(st.integers(1, max_n))
    n_k = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    d_v = draw(st.sampled_from([d, max(1, d // 2), d + 3]))
    lead = tuple(draw(st.lists(st.integers(1, max_batch), max_size=2)))
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.sampled_from([0.1, 1.0, 10.0]))
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal(lead + (n_q, d)) * spread).astype(dtype)
    k = rng.standard_normal(lead + (n_k, d)).astype(dtype)
    v = rng.standard_normal(lead + (n_k, d_v)).astype(dtype)
    causal = draw(st.booleans())
    return q, k, v, causal
