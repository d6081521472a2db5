"""Hypothesis strategies and the derived-tolerance check shared by the attention tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from flashlab.tolerance import Bound, attention_bound, check_close


def assert_close(actual, expected, q, k, v, *, quantity="o", scale=None, dtype=None, what=None):
    """``actual`` within the derived bound (:func:`flashlab.tolerance.attention_bound`) of ``expected``.

    ``q, k, v`` are the inputs both were computed from; ``dtype`` the compute dtype (default q's). A
    float64 ``expected`` is the reference; one computed in a lower precision doubles the bound (two
    computations of one exact value, each within it).
    """
    bound = attention_bound(q, k, v, dtype=dtype, scale=scale, quantity=quantity)
    if np.asarray(expected).dtype != np.float64:
        bound = Bound(2 * bound.atol, "twice " + bound.formula)
    check_close(actual, expected, bound, what or quantity)


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
