"""Split-KV attention (flash-decoding in NumPy): exact for any split count, shape and mask."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashlab.attention import naive_attention
from flashlab.online_softmax import state_lse
from flashlab.split_kv import MIN_KEYS_PER_SPLIT, auto_splits, split_bounds, split_kv_attention
from flashlab.tolerance import attention_bound, check_close
from tests.strategies import attention_problems


def reference(q, k, v, causal, scale=None):
    """float64 attention and lse, the yardstick of every comparison."""
    return naive_attention(
        *(np.asarray(x, np.float64) for x in (q, k, v)), causal=causal, scale=scale, return_lse=True
    )


def check(q, k, v, causal, splits, scale=None):
    o, lse = split_kv_attention(q, k, v, splits=splits, causal=causal, scale=scale, return_lse=True)
    o_ref, lse_ref = reference(q, k, v, causal, scale)
    dtype = np.promote_types(np.result_type(q, k, v), np.float32)
    check_close(o, o_ref, attention_bound(q, k, v, dtype=dtype, scale=scale), "o")
    check_close(lse, lse_ref, attention_bound(q, k, v, dtype=dtype, scale=scale, quantity="lse"), "lse")


@given(problem=attention_problems(), splits=st.integers(1, 40))
def test_equals_reference_for_any_splits(problem, splits):
    q, k, v, causal = problem  # ragged N_q != N_k, causal bottom-right, splits not dividing N_k
    check(q, k, v, causal, splits)


@given(n_k=st.integers(1, 3000), heads=st.integers(1, 4), d=st.sampled_from([8, 64]), seed=st.integers(0, 99))
def test_decoding_one_query_row(n_k, heads, d, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((heads, 1, d)).astype(np.float32)
    k, v = (rng.standard_normal((heads, n_k, d)).astype(np.float16) for _ in range(2))  # a float16 cache
    check(q, k, v, causal=True, splits="auto")


def test_large_logits_and_fully_masked_rows():
    rng = np.random.default_rng(0)
    q = (rng.standard_normal((2, 7, 16)) * 30).astype(np.float32)  # logits of several hundred
    k, v = (rng.standard_normal((2, 5, 16)).astype(np.float32) for _ in range(2))
    o, lse = split_kv_attention(q, k, v, splits=3, causal=True, return_lse=True)
    assert np.all(o[:, :2] == 0) and np.all(np.isneginf(lse[:, :2]))  # N_q > N_k: rows 0, 1 see no key
    check(q, k, v, causal=True, splits=3, scale=2.0)


def test_more_splits_than_keys_merge_empty_chunks():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((3, 4)) for _ in range(3))
    trace = []
    split_kv_attention(q, k, v, splits=5, trace=trace)
    partials = [t for t in trace if t.kind == "partial"]
    assert [t.cols for t in partials] == [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]
    assert all(np.all(np.isneginf(t.state.m)) and np.all(t.state.l == 0) for t in partials[3:])
    check(q, k, v, causal=False, splits=5)


def test_trace_holds_every_partial_state_and_the_running_merge():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 8, 4)) for _ in range(3))
    trace = []
    o, lse = split_kv_attention(q, k, v, splits=3, return_lse=True, trace=trace)
    assert [(t.kind, t.split) for t in trace] == [
        ("partial", 0),
        ("partial", 1),
        ("partial", 2),
        ("merge", 1),
        ("merge", 2),
    ]
    for t in trace:  # each partial (and each prefix merge) is attention over its own keys alone
        k_t, v_t = k[..., slice(*t.cols), :], v[..., slice(*t.cols), :]
        o_ref, lse_ref = reference(q, k_t, v_t, causal=False)
        check_close(t.state.o, o_ref, attention_bound(q, k_t, v_t), f"{t.kind} {t.split} o")
        check_close(state_lse(t.state), lse_ref, attention_bound(q, k_t, v_t, quantity="lse"), "lse")
    np.testing.assert_array_equal(trace[-1].state.o, o)


@given(n_k=st.integers(0, 10**6), splits=st.integers(1, 300))
def test_split_bounds_cover_the_keys_once(n_k, splits):
    bounds = split_bounds(n_k, splits)
    assert len(bounds) == splits and bounds[0][0] == 0 and bounds[-1][1] == n_k
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [c1 - c0 for c0, c1 in bounds if c1 > c0]
    assert all(size == -(-n_k // splits) for size in sizes[:-1]) and sizes[-1:] <= [-(-n_k // splits)]


def test_auto_rule_fills_the_sms_with_long_enough_chunks():
    assert auto_splits(65536, blocks=1) == 132  # batch 1, one head: one block per SM
    assert auto_splits(16384, blocks=1) == 16384 // MIN_KEYS_PER_SPLIT  # then chunks would get too short
    assert auto_splits(16384, blocks=32) == 5  # 32 heads: 5 splits give 160 >= 132 blocks
    assert auto_splits(16384, blocks=200) == 1  # already more blocks than SMs
    assert auto_splits(1000, blocks=1) == -(-1000 // MIN_KEYS_PER_SPLIT)  # short cache: chunks stay long
    assert auto_splits(0, blocks=1) == 1


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        (0, "splits must be a positive integer"),
        (-3, ">= 1"),
        (2.5, "or 'auto'"),
        ("many", "'auto'"),
        (True, "positive integer"),
    ],
)
def test_bad_splits_are_refused_by_name(splits, message):
    q = np.zeros((1, 4))
    with pytest.raises(ValueError, match=message):
        split_kv_attention(q, q, q, splits=splits)


def test_bad_shapes_are_refused_by_name():
    with pytest.raises(ValueError, match="k's last dim"):
        split_kv_attention(np.zeros((1, 4)), np.zeros((3, 5)), np.zeros((3, 5)), splits=2)
    with pytest.raises(ValueError, match="v must have as many rows as k"):
        split_kv_attention(np.zeros((1, 4)), np.zeros((3, 4)), np.zeros((2, 4)), splits=2)
