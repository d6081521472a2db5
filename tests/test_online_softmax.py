"""Chapter 1: the note's loop (flaw kept), the three softmax loops, online attention, the merge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashlab import check
from flashlab.attention import naive_attention
from flashlab.inputs import causal_mask
from flashlab.online_softmax import (
    Counted,
    State,
    chunk_state,
    count_accesses,
    empty_state,
    merge,
    merge_in_any_order,
    naive_softmax,
    notes_attention,
    online_attention,
    online_softmax,
    online_update,
    safe_softmax,
    state_lse,
)
from flashlab.tolerance import Bound, check_close, softmax_bound
from tests.strategies import assert_close, attention_problems

EXP_LIMIT = {np.float32: math.log(np.finfo(np.float32).max), np.float64: math.log(np.finfo(np.float64).max)}

# --- the note's loop -------------------------------------------------------------------------------


def test_notes_attention_reproduces_the_notes_comparison_with_torch():
    Q, K, V = [1, 5, 9], [1, 2, 3], [2, 4, 8]
    t = torch.softmax(torch.tensor(Q, dtype=torch.float)[:, None] * torch.tensor(K, dtype=torch.float), -1)
    torch_out = (t @ torch.tensor(V, dtype=torch.float)).tolist()
    ours = notes_attention(Q, K, V)
    assert isinstance(ours, list) and len(ours) == 3
    np.testing.assert_allclose(ours, torch_out, rtol=1e-6)
    ref = naive_attention(
        np.array(Q, float)[:, None], np.array(K, float)[:, None], np.array(V, float)[:, None]
    )
    np.testing.assert_allclose(ours, ref[:, 0], rtol=1e-12)
    assert notes_attention(Q, K, V) == ours, "no state may carry over between calls (the note used globals)"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_notes_attention_keeps_the_overflow_flaw_on_purpose(dtype):
    """The note takes exp(q k) without a running max: finite just below log(max float), nan above."""
    limit = EXP_LIMIT[dtype]
    below = notes_attention([limit - 1], [1.0], [1.0], dtype=dtype)
    assert below == [1.0]
    with np.errstate(all="ignore"):
        above = notes_attention([limit + 1, 1.0], [1.0, 0.5], [1.0, 2.0], dtype=dtype)
    assert math.isnan(above[0]), "exp(q k) = inf, then inf / inf = nan: the documented flaw"
    assert above[1] == pytest.approx(
        naive_attention([[1.0]], [[1.0], [0.5]], [[1.0], [2.0]], scale=1.0)[0, 0]
    )
    stable = online_attention(
        np.array([[limit + 1]]), np.array([[1.0], [0.5]]), np.array([[1.0], [2.0]]), scale=1
    )
    assert np.all(np.isfinite(stable))


def test_notes_attention_trace_shows_where_nan_appears():
    trace = []
    with np.errstate(all="ignore"):
        notes_attention([1.0, 60.0], [1.0, 2.0], [2.0, 4.0], dtype=np.float32, trace=trace)
    assert [(j, i) for j, i, *_ in trace] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    j, i, d_b, d, o = trace[-1]
    assert np.isinf(d_b) and np.isinf(d) and np.isnan(o)  # exp(120) overflows float32 at key 1, query 1
    assert all(np.isfinite(t[2:]).all() for t in trace[:3])


def test_notes_attention_rejects_mismatched_or_nested_input_by_name():
    with pytest.raises(ValueError, match="K and V must have the same length"):
        notes_attention([1.0], [1.0, 2.0], [1.0, 2.0, 3.0])  # an extra value would be ignored silently
    with pytest.raises(ValueError, match="Q must be a 1-d sequence"):
        notes_attention([[1.0, 2.0]], [1.0], [1.0])


# --- softmax, element by element -------------------------------------------------------------------


@st.composite
def score_vectors(draw):
    """1-d scores: length 1..40, magnitudes up to 1e4, some -inf entries but never all."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(n) * draw(st.sampled_from([1e-3, 1.0, 30.0, 100.0, 1e4]))
    if n > 1:
        x[rng.random(n) < draw(st.sampled_from([0.0, 0.3, 0.8]))] = -np.inf
        x[rng.integers(n)] = rng.standard_normal() * 5  # at least one finite score
    return x.astype(dtype)


def softmax64(x):
    x = np.asarray(x, np.float64)
    p = np.exp(x - x.max())
    return p / p.sum()


@given(score_vectors())
def test_online_equals_safe_equals_float64_reference(x):
    ref = softmax64(x)
    for fn in (safe_softmax, online_softmax):
        y = fn(x)
        assert y.dtype == x.dtype
        check_close(y, ref, softmax_bound(x), fn.__name__)
    bound = softmax_bound(x)
    check_close(online_softmax(x), safe_softmax(x), Bound(2 * bound.atol, "twice " + bound.formula))


@given(score_vectors())
def test_naive_softmax_agrees_while_exp_does_not_overflow(x):
    x = np.where(np.isfinite(x), np.clip(x, -30, 30), x).astype(x.dtype)
    check_close(naive_softmax(x), softmax64(x), softmax_bound(x), "naive_softmax")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_naive_softmax_overflows_past_the_exp_limit_and_the_stable_ones_do_not(dtype):
    x = np.array([0.0, EXP_LIMIT[dtype] + 1], dtype)
    with np.errstate(all="ignore"):
        assert np.isnan(naive_softmax(x)[-1])
    for fn in (safe_softmax, online_softmax):
        np.testing.assert_allclose(fn(x), softmax64(x), rtol=1e-6)


@pytest.mark.parametrize("fn", [safe_softmax, online_softmax])
def test_all_minus_inf_gives_zeros_and_length_one_gives_one(fn):
    assert fn(np.full(3, -np.inf)).tolist() == [0.0, 0.0, 0.0]
    assert fn(np.array([1e4], np.float32)).tolist() == [1.0]
    assert fn(np.zeros(0)).shape == (0,)


def test_online_update_rescales_the_old_sum_when_the_max_grows():
    m, d = online_update(1.0, 2.0, 3.0)
    assert (m, d) == (3.0, pytest.approx(2 * math.exp(-2) + 1, rel=1e-15))
    assert online_update(-np.inf, 0.0, -np.inf) == (-np.inf, 0.0)
    assert online_update(2.0, 1.5, -np.inf) == (2.0, 1.5)


@pytest.mark.parametrize("fn", [naive_softmax, safe_softmax, online_softmax])
def test_softmax_rejects_bad_input_by_name(fn):
    with pytest.raises(ValueError, match="x must be a 1-d vector"):
        fn(np.zeros((2, 2)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        fn(np.arange(3))
    with pytest.raises(ValueError, match="out must have the length of x"):
        fn(np.zeros(3), out=np.zeros(2))


@given(st.integers(1, 50), st.sampled_from([np.float32, np.float64]))
def test_counted_loops_make_3_4_3_accesses_per_element(n, dtype):
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    counts = {fn.__name__: count_accesses(fn, x) for fn in (naive_softmax, safe_softmax, online_softmax)}
    assert counts["naive_softmax"] == {"reads": 2, "writes": 1, "accesses": 3}
    assert counts["safe_softmax"] == {"reads": 3, "writes": 1, "accesses": 4}
    assert counts["online_softmax"] == {"reads": 2, "writes": 1, "accesses": 3}


def test_counted_wraps_an_array_and_counts_each_access():
    a = Counted(np.zeros(4))
    a[1] = 2.0
    assert a[1] == 2.0 and a[0] == 0.0 and len(a) == 4
    assert (a.reads, a.writes) == (2, 1)
    with pytest.raises(ValueError, match="non-empty 1-d"):
        count_accesses(online_softmax, np.zeros(0))


# --- online attention and the merge ----------------------------------------------------------------


@given(attention_problems(max_n=40, max_d=16))
def test_online_attention_equals_naive_attention(problem):
    q, k, v, causal = problem
    o, lse = online_attention(q, k, v, causal=causal, return_lse=True)
    o_ref, lse_ref = naive_attention(q, k, v, causal=causal, return_lse=True)
    assert o.dtype == o_ref.dtype and lse.dtype == lse_ref.dtype
    assert_close(o, o_ref, q, k, v)
    assert_close(lse, lse_ref, q, k, v, quantity="lse")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_online_attention_one_query_large_logits_and_scale(dtype):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal(8) * 300, rng.standard_normal((5, 8)), rng.standard_normal((5, 3))
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    o, lse = online_attention(q, k, v, scale=0.5, return_lse=True)
    o_ref, lse_ref = naive_attention(q[None], k, v, scale=0.5, return_lse=True)
    assert o.shape == (3,) and lse.shape == () and o.dtype == dtype
    np.testing.assert_allclose(o, o_ref[0], rtol=1e-3 if dtype == np.float16 else 1e-5)
    assert np.isfinite(lse) and lse == pytest.approx(lse_ref[0], rel=1e-5)


def test_online_attention_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match="k's last dim"):
        online_attention(np.zeros((2, 3)), np.zeros((4, 5)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        online_attention(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros((4, 5)), scale=-1.0)
    with pytest.raises(ValueError, match="mask must have shape"):
        chunk_state(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros((4, 5)), mask=np.ones((4, 2), bool))


def _assert_same_state(got: State, want: State):
    np.testing.assert_array_equal(got.m, want.m)
    np.testing.assert_allclose(got.l, want.l, rtol=1e-12, atol=0)
    scale = max(1.0, float(np.abs(want.o).max(initial=0)))
    assert float(np.abs(got.o - want.o).max(initial=0)) <= 1e-12 * scale


@given(attention_problems(max_n=30, max_d=8, dtypes=(np.float64,)), st.data())
def test_any_chunking_and_any_merge_order_equals_one_pass(problem, data):
    q, k, v, causal = problem
    n_q, n_k = q.shape[-2], k.shape[-2]
    mask = causal_mask(n_q, n_k) if causal else None
    cuts = sorted(data.draw(st.lists(st.integers(0, n_k), max_size=6)))  # repeated cuts: empty chunks
    bounds = [0, *cuts, n_k]
    chunks = [
        chunk_state(q, k[..., s:e, :], v[..., s:e, :], mask=None if mask is None else mask[:, s:e])
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    one_pass = chunk_state(q, k, v, mask=mask)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    _assert_same_state(merge_in_any_order(chunks, rng), one_pass)
    o_ref, lse_ref = naive_attention(q, k, v, causal=causal, return_lse=True)
    assert_close(one_pass.o, o_ref, q, k, v)
    assert_close(state_lse(one_pass), lse_ref, q, k, v, quantity="lse")


def test_merge_is_exactly_commutative_and_empty_is_its_identity():
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((4, 5)), rng.standard_normal((6, 5)) * 40, rng.standard_normal((6, 2))
    a, b = chunk_state(q, k[:2], v[:2]), chunk_state(q, k[2:], v[2:])
    for x, y in zip(merge(a, b), merge(b, a), strict=True):
        np.testing.assert_array_equal(x, y)
    empty = empty_state((4,), 2)
    for x, y in zip(merge(empty, a), a, strict=True):
        np.testing.assert_array_equal(x, y)
    both = merge(empty, empty)
    assert np.all(both.m == -np.inf) and np.all(both.l == 0) and np.all(both.o == 0)
    assert chunk_state(q, k[:0], v[:0]).l.tolist() == [0.0] * 4


# --- the exercises ---------------------------------------------------------------------------------


def _rejects(name: str, fn, words: str):
    with pytest.raises(check.Mistake, match=words):
        check.check(name, fn)


def test_online_update_checker_accepts_the_solution_and_names_mistakes(capsys):
    assert check.check("online_update", online_update) is True

    def no_rescale(m, d, x):
        m_new = max(m, x)
        return m_new, d + np.exp(x - m_new)

    def no_shift(m, d, x):
        return max(m, x), d + np.exp(x)

    def nan_when_empty(m, d, x):
        m_new = max(m, x)
        return m_new, d * np.exp(m - m_new) + np.exp(x - m_new)

    def python_exp_no_shift(m, d, x):
        m_new = max(m, x)
        return m_new, d * math.exp(m - m_new) + math.exp(x)

    def overflow_only(m, d, x):  # right on small logits, wrong in float32 beyond 88.7
        m_new = max(m, x)
        if m_new == -np.inf:
            return m, d
        return m_new, (d * np.exp(m) + np.exp(x)) / np.exp(m_new)

    def keeps_old_max(m, d, x):
        return m, d + np.exp(x - m)

    _rejects("online_update", no_rescale, "old denominator was not rescaled by exp\\(m_old - m_new\\)")
    _rejects("online_update", no_shift, "not shifted.*overflows for logits > 88.7")
    _rejects("online_update", nan_when_empty, "nothing to add")
    _rejects("online_update", python_exp_no_shift, "not shifted")
    _rejects("online_update", overflow_only, "overflows for logits > 88.7")
    _rejects("online_update", keeps_old_max, "running max must be max\\(m, x\\)")


def test_merge_checker_accepts_the_solution_and_names_mistakes(capsys):
    assert check.check("merge_states", merge) is True

    def weights(a, b):
        m = max(a.m, b.m)
        return m, a.l * np.exp(a.m - m), b.l * np.exp(b.m - m)

    def added_sums(a, b):
        m, w_a, w_b = weights(a, b)
        return m, a.l + b.l, (w_a * a.o + w_b * b.o) / (w_a + w_b)

    def plain_average(a, b):
        m, w_a, w_b = weights(a, b)
        return m, w_a + w_b, (a.o + b.o) / 2

    def not_normalised(a, b):
        m, w_a, w_b = weights(a, b)
        return m, w_a + w_b, w_a * a.o + w_b * b.o

    def nan_for_empty(a, b):
        m, w_a, w_b = weights(a, b)
        return m, w_a + w_b, (w_a * a.o + w_b * b.o) / (w_a + w_b)

    def unshifted(a, b):
        m = max(a.m, b.m)
        w_a, w_b = a.l * np.exp(a.m), b.l * np.exp(b.m)
        return m, (w_a + w_b) / np.exp(m), (w_a * a.o + w_b * b.o) / (w_a + w_b)

    _rejects("merge_states", added_sums, "common max")
    _rejects("merge_states", plain_average, "plain average")
    _rejects("merge_states", not_normalised, "not divided by the merged l")
    _rejects("merge_states", nan_for_empty, "two empty states")
    _rejects("merge_states", unshifted, "overflows for logits > 88.7")
