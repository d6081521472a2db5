"""The exercises of chapters 2, 3 and 5: each solution is right, and typical wrong answers are rejected
with words that name the mistake.

Chapter 2: FA2's inner update for one tile (``fa2_tile_update``); chapter 3: FA2's forward HBM traffic
in closed form (``fa2_traffic``); chapter 5: the softmax backward for a tile (``softmax_backward``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashlab import check, traffic
from flashlab.attention import naive_attention
from flashlab.exercises.backward import softmax_backward_tile, softmax_problem
from flashlab.exercises.flash import fa2_tile_update, score_tiles
from flashlab.exercises.traffic import fa2_forward_traffic
from flashlab.flash import flash_attention
from flashlab.memory import MemoryModel
from tests.strategies import assert_close, attention_problems


def _rejects(name: str, fn, words: str):
    with pytest.raises(check.Mistake, match=words):
        check.check(name, fn)


def _safe(m):
    return np.where(np.isneginf(m), 0.0, m)


# --- chapter 2: FA2's inner update ------------------------------------------------------------------


@given(attention_problems(max_n=30, max_d=8, max_batch=1), st.integers(1, 12), st.booleans())
def test_fa2_tile_update_folded_over_tiles_in_any_order_is_attention(problem, block_k, reverse):
    *qkv, causal = problem
    q, k, v = (x.reshape((-1,) + x.shape[-2:])[0] for x in qkv)  # one (batch, head) problem
    m = np.full(len(q), -np.inf, q.dtype)
    l = np.zeros(len(q), q.dtype)  # noqa: E741
    acc = np.zeros((len(q), v.shape[1]), q.dtype)
    for s, v_j in score_tiles(q, k, v, block_k, causal=causal, reverse=reverse):
        m, l, acc = fa2_tile_update(m, l, acc, s, v_j)  # noqa: E741
    o, lse = naive_attention(q, k, v, causal=causal, return_lse=True)
    assert np.all(np.isfinite(l)) and np.all(np.isfinite(acc))
    assert_close(acc / np.where(l > 0, l, 1.0)[:, None], o, q, k, v)
    with np.errstate(divide="ignore"):
        assert_close(m + np.log(l), lse, q, k, v, quantity="lse")


def test_fa2_tile_update_checker_accepts_the_solution_and_names_mistakes(capsys):
    assert check.check("fa2_tile_update", fa2_tile_update) is True

    def parts(m, s):
        m_new = np.maximum(m, s.max(axis=1))
        return m_new, np.exp(s - _safe(m_new)[:, None]), np.exp(m - _safe(m_new))

    def acc_not_rescaled(m, l, acc, s, v):  # noqa: E741
        m_new, p, alpha = parts(m, s)
        return m_new, alpha * l + p.sum(axis=1), acc + p @ v

    def l_not_rescaled(m, l, acc, s, v):  # noqa: E741
        m_new, p, alpha = parts(m, s)
        return m_new, l + p.sum(axis=1), alpha[:, None] * acc + p @ v

    def divides_by_l(m, l, acc, s, v):  # noqa: E741
        m_new, p, alpha = parts(m, s)
        l_new = alpha * l + p.sum(axis=1)
        return m_new, l_new, (alpha[:, None] * acc + p @ v) / l_new[:, None]

    def tile_max(m, l, acc, s, v):  # noqa: E741
        m_t = s.max(axis=1)
        p, alpha = np.exp(s - _safe(m_t)[:, None]), np.exp(m - _safe(m_t))
        return m_t, alpha * l + p.sum(axis=1), alpha[:, None] * acc + p @ v

    def nan_when_masked(m, l, acc, s, v):  # noqa: E741
        m_new = np.maximum(m, s.max(axis=1))
        p, alpha = np.exp(s - m_new[:, None]), np.exp(m - m_new)
        return m_new, alpha * l + p.sum(axis=1), alpha[:, None] * acc + p @ v

    def overflows(m, l, acc, s, v):  # noqa: E741  (right while exp(s) is finite)
        m_new, p, alpha = parts(m, s)
        big = np.exp(s).sum(axis=1) / np.exp(_safe(m_new))
        return m_new, alpha * l + big, alpha[:, None] * acc + p @ v

    _rejects("fa2_tile_update", acc_not_rescaled, r"acc was not rescaled by alpha = exp\(m_old - m_new\)")
    _rejects("fa2_tile_update", l_not_rescaled, r"l was not rescaled")
    _rejects("fa2_tile_update", divides_by_l, r"divided by l inside the loop")
    _rejects("fa2_tile_update", tile_max, r"tile's own rowmax\(S\).*running max")
    _rejects("fa2_tile_update", nan_when_masked, r"exp\(-inf - \(-inf\)\) = exp\(nan\)")
    _rejects("fa2_tile_update", overflows, r"exp overflowed for scores above 88.7")


# --- chapter 3: FA2's forward traffic -----------------------------------------------------------------


@given(st.integers(1, 5000), st.integers(1, 256), st.integers(1, 600), st.integers(1, 600))
def test_fa2_traffic_solution_is_the_closed_form_of_chapter_3(n, d, block_q, block_k):
    closed = traffic.fa2_forward(n, n, d, block_q=block_q, block_k=block_k)
    assert fa2_forward_traffic(n, d, block_q, block_k) == (closed.read_elements, closed.write_elements)


@pytest.mark.parametrize("n, d, block_q, block_k", [(29, 3, 4, 5), (16, 2, 16, 3), (9, 5, 2, 20)])
def test_fa2_traffic_solution_is_what_a_run_counts(n, d, block_q, block_k):
    memory = MemoryModel()
    q = np.ones((n, d))
    flash_attention(q, q, q, block_q=block_q, block_k=block_k, loop_order="fa2", memory=memory)
    assert fa2_forward_traffic(n, d, block_q, block_k) == (
        memory.hbm_read_elements,
        memory.hbm_write_elements,
    )


def test_fa2_traffic_checker_accepts_the_solution_and_names_the_wrong_term(capsys):
    assert check.check("fa2_traffic", fa2_forward_traffic) is True

    def t(n, b):
        return math.ceil(n / b)

    def t_c_for_t_r(n, d, block_q, block_k):
        return n * d + t(n, block_k) * 2 * n * d, n * d + n

    def kv_read_once(n, d, block_q, block_k):
        return 3 * n * d, n * d + n

    def o_written_per_tile(n, d, block_q, block_k):
        return n * d + t(n, block_q) * 2 * n * d, t(n, block_k) * n * d + n

    def forgot_lse(n, d, block_q, block_k):
        return n * d + t(n, block_q) * 2 * n * d, n * d

    def floor_blocks(n, d, block_q, block_k):
        return n * d + n // block_q * 2 * n * d, n * d + n

    _rejects("fa2_traffic", t_c_for_t_r, r"used T_c = ceil\(N / B_c\) = 4 where T_r = ceil\(N / B_r\) = 7")
    _rejects("fa2_traffic", kv_read_once, r"K and V are read once per query block: T_r \* 2Nd")
    _rejects("fa2_traffic", o_written_per_tile, r"O is written once, not per tile")
    _rejects("fa2_traffic", forgot_lse, r"forgot lse")
    _rejects("fa2_traffic", floor_blocks, r"not floor\(N / B_r\)")


# --- chapter 5: the softmax backward for a tile --------------------------------------------------------


@given(
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(1, 5),
    st.booleans(),
)
def test_softmax_backward_tile_by_tile_is_the_jacobian_product(n_q, n_k, d_v, block_q, block_k, causal):
    p, dp, do, o = softmax_problem(n_q, n_k, d_v, causal=causal, seed=n_q * 100 + n_k)
    ds = np.empty_like(p)
    for r in range(0, n_q, block_q):
        for c in range(0, n_k, block_k):
            rows, cols = slice(r, r + block_q), slice(c, c + block_k)
            ds[rows, cols] = softmax_backward_tile(p[rows, cols], dp[rows, cols], do[rows], o[rows])
    jacobian = np.stack([(np.diag(p_i) - np.outer(p_i, p_i)) @ dp_i for p_i, dp_i in zip(p, dp, strict=True)])
    np.testing.assert_allclose(ds, jacobian, rtol=0, atol=1e-12)


def test_softmax_backward_checker_accepts_the_solution_and_names_mistakes(capsys):
    assert check.check("softmax_backward", softmax_backward_tile) is True

    def d_of(do, o):
        return np.sum(do * o, axis=1)

    def forgot_d(p, dp, do, o):
        return p * dp

    def d_from_the_tile(p, dp, do, o):
        return p * (dp - np.sum(p * dp, axis=1, keepdims=True))

    def rowsum_of_dp(p, dp, do, o):
        return p * (dp - dp.sum(axis=1, keepdims=True))

    def wrong_axis(p, dp, do, o):
        return p * (dp - d_of(do, o))

    def scaled(p, dp, do, o):
        return p * (dp - d_of(do, o)[:, None]) / math.sqrt(4)

    _rejects("softmax_backward", forgot_d, r"forgot to subtract D")
    _rejects("softmax_backward", d_from_the_tile, r"D was taken from this tile's P and dP")
    _rejects("softmax_backward", rowsum_of_dp, r"D = rowsum\(dP\) leaves out the weights")
    _rejects("softmax_backward", wrong_axis, r"wrong axis.*D\[:, None\]")
    _rejects("softmax_backward", scaled, r"0.5 times P \* \(dP - D\): the softmax backward has no scale")


def test_softmax_backward_wrong_axis_on_a_ragged_tile_is_explained():
    """Square tiles hide a wrong broadcast; a ragged one makes NumPy raise, and the checker explains."""
    from flashlab.exercises.backward import check_softmax_backward

    def ragged_only(p, dp, do, o):
        if p.shape[0] == p.shape[1]:
            return softmax_backward_tile(p, dp, do, o)
        return p * (dp - np.sum(do * o, axis=1))

    with pytest.raises(check.Mistake, match=r"did not broadcast.*subtract D\[:, None\]"):
        check_softmax_backward(ragged_only)
