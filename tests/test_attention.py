"""naive_attention (Algorithm 0), held to torch's scaled_dot_product_attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashlab import naive_attention
from flashlab.inputs import causal_mask
from tests.strategies import assert_close, attention_problems


def sdpa(q, k, v, causal, scale=None):
    """torch SDPA with an explicit bottom-right boolean mask (its is_causal aligns top-left)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    mask = torch.from_numpy(causal_mask(n_q, n_k)) if causal else None
    o = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), attn_mask=mask, scale=scale
    )
    if causal:  # torch gives NaN for rows that see no key; the course's convention is 0
        o = torch.nan_to_num(o, nan=0.0)
    return o.numpy()


def lse_reference(q, k, causal, scale):
    s = torch.from_numpy(q) @ torch.from_numpy(k).transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(~torch.from_numpy(causal_mask(q.shape[-2], k.shape[-2])), -torch.inf)
    return torch.logsumexp(s, dim=-1).numpy()


@given(attention_problems(max_n=80, dtypes=(np.float64,)))
def test_matches_torch_sdpa_float64(problem):
    q, k, v, causal = problem
    o, lse = naive_attention(q, k, v, causal=causal, return_lse=True)
    assert_close(o, sdpa(q, k, v, causal), q, k, v)
    assert_close(lse, lse_reference(q, k, causal, 1 / np.sqrt(q.shape[-1])), q, k, v, quantity="lse")


@given(attention_problems(max_n=60, dtypes=(np.float32,)), st.floats(0.01, 3.0))
def test_matches_torch_sdpa_float32_with_explicit_scale(problem, scale):
    q, k, v, causal = problem
    o = naive_attention(q, k, v, causal=causal, scale=scale)
    assert o.dtype == np.float32
    assert_close(o, sdpa(*(x.astype(np.float64) for x in (q, k, v)), causal, scale), q, k, v, scale=scale)


def test_broadcast_leading_dims_like_heads_sharing_keys():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 5, 8))  # batch 2, 4 heads
    k = rng.standard_normal((2, 1, 7, 8))  # one K/V head shared by all query heads (MQA)
    v = rng.standard_normal((1, 1, 7, 3))
    o = naive_attention(q, k, v)
    assert o.shape == (2, 4, 5, 3)
    k_full, v_full = np.broadcast_to(k, (2, 4, 7, 8)).copy(), np.broadcast_to(v, (2, 4, 7, 3)).copy()
    assert_close(o, sdpa(q, k_full, v_full, False), q, k_full, v_full)


def test_causal_is_bottom_right_not_top_left():
    # 2 queries, 4 keys: the last query sees all 4 keys, the first sees 3 (not 1, as top-left would).
    mask = causal_mask(2, 4)
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 4)), rng.standard_normal((4, 4)), rng.standard_normal((4, 2))
    top_left = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a) for a in (q, k, v)), is_causal=True
    ).numpy()
    assert not np.allclose(naive_attention(q, k, v, causal=True), top_left)


def test_rows_that_see_no_key_give_zero_and_minus_inf_lse():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((5, 4)), rng.standard_normal((2, 4)), rng.standard_normal((2, 3))
    o, lse = naive_attention(q, k, v, causal=True, return_lse=True)
    # query i sees key j iff j <= i + 2 - 5: rows 0, 1, 2 see nothing
    assert np.all(o[:3] == 0) and np.all(lse[:3] == -np.inf)
    assert np.all(np.isfinite(lse[3:])) and np.all(np.abs(o[3:]) > 0)


def test_large_logits_stay_finite_and_exact():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((16, 8)) * 300  # logits of order 1e4: exp overflows without the max
    k, v = rng.standard_normal((16, 8)), rng.standard_normal((16, 8))
    for dtype in (np.float32, np.float64):
        qd, kd, vd = (x.astype(dtype) for x in (q, k, v))
        o = naive_attention(qd, kd, vd)
        assert np.all(np.isfinite(o))
        assert_close(o, sdpa(*(x.astype(np.float64) for x in (qd, kd, vd)), False), qd, kd, vd)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes_are_kept_and_float16_is_computed_in_float32(dtype):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((6, 8)).astype(dtype) for _ in range(3))
    o, lse = naive_attention(q, k, v, return_lse=True)
    assert o.dtype == dtype
    assert lse.dtype == (np.float32 if dtype == np.float16 else dtype)
    ref = naive_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    assert np.max(np.abs(o - ref)) < (2e-3 if dtype == np.float16 else 1e-6)


def test_nan_in_gives_nan_out_only_where_it_reaches():
    q, k, v = np.ones((3, 4)), np.ones((3, 4)), np.ones((3, 2))
    q[1, 0] = np.nan
    o = naive_attention(q, k, v)
    assert np.isnan(o[1]).all() and np.isfinite(o[[0, 2]]).all()


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "words"),
    [
        ((np.ones((4, 8)), np.ones((4, 7)), np.ones((4, 8))), {}, ValueError, "k's last dim"),
        ((np.ones((4, 8)), np.ones((4, 8)), np.ones((5, 8))), {}, ValueError, "v must have as many rows"),
        ((np.ones((2, 4, 8)), np.ones((3, 4, 8)), np.ones((3, 4, 8))), {}, ValueError, "broadcast"),
        ((np.ones((4, 8), int), np.ones((4, 8)), np.ones((4, 8))), {}, TypeError, "q must be a floating"),
        (
            (np.ones((4, 8)), np.ones((4, 8)), np.ones((4, 8), np.int32)),
            {},
            TypeError,
            "v must be a floating",
        ),
        ((np.ones(8), np.ones((4, 8)), np.ones((4, 8))), {}, ValueError, "q must have at least 2 dims"),
        ((np.ones((4, 8)),) * 3, {"scale": 0.0}, ValueError, "scale must be finite and > 0"),
        ((np.ones((4, 8)),) * 3, {"scale": -1.0}, ValueError, "scale must be finite and > 0"),
        ((np.ones((4, 8)),) * 3, {"scale": float("inf")}, ValueError, "scale must be finite and > 0"),
        ((np.ones((4, 8)),) * 3, {"scale": float("nan")}, ValueError, "scale must be finite and > 0"),
        ((np.ones((4, 8)),) * 3, {"scale": "0.1"}, TypeError, "scale must be a real number"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_the_argument(args, kwargs, error, words):
    with pytest.raises(error, match=words):
        naive_attention(*args, **kwargs)


# --- chapter 0's warm-up exercise: each slip gets its own message ---------------------------------
def _slip(q, k, v, slip=None):
    s = q @ k if slip == "no_transpose" else q @ k.T
    s = s if slip == "no_scale" else s / np.sqrt(q.shape[1])
    axis = 0 if slip == "axis0" else 1
    p = np.exp(s) if slip == "no_max" else np.exp(s - s.max(axis=axis, keepdims=True))
    return (p if slip == "no_norm" else p / p.sum(axis=axis, keepdims=True)) @ v


@pytest.mark.parametrize(
    ("slip", "words"),
    [
        ("axis0", "down the columns"),
        ("no_scale", "not scaled"),
        ("no_max", "overflowed"),
        ("no_norm", "not normalised"),
        ("no_transpose", "transpose K"),
    ],
)
def test_attention_warm_up_names_each_slip(slip, words):
    from flashlab import check

    check.check("attention", _slip)  # the right one passes
    with pytest.raises(check.Mistake, match=words):
        check.check("attention", lambda q, k, v: _slip(q, k, v, slip))
