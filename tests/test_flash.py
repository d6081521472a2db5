"""Chapter 2: the blocked FlashAttention forward (FA1 and FA2 loop orders) and its tile schedule."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashlab.attention import naive_attention
from flashlab.flash import flash_attention
from flashlab.inputs import causal_mask
from flashlab.memory import MemoryModel
from flashlab.tiles import (
    block_range,
    coverage,
    first_row_block,
    last_col_block,
    n_blocks,
    tile_counts,
    tile_grid,
    tile_mask,
    tile_needs_mask,
    visit_order,
)
from tests.strategies import assert_close, attention_problems

LOOP_ORDERS = ["fa1", "fa2"]


def blocks(draw, n_q, n_k):
    """Block sizes 1..130 (rarely dividing N), but at most ~40 blocks per side to keep tests fast."""
    block_q = draw(st.integers(max(1, n_q // 40), 130))
    block_k = draw(st.integers(max(1, n_k // 40), 130))
    return block_q, block_k


@given(problem=attention_problems(), data=st.data(), loop_order=st.sampled_from(LOOP_ORDERS))
def test_equals_naive_attention(problem, data, loop_order):
    q, k, v, causal = problem
    block_q, block_k = blocks(data.draw, q.shape[-2], k.shape[-2])
    o, lse = flash_attention(
        q, k, v, block_q=block_q, block_k=block_k, causal=causal, loop_order=loop_order, return_lse=True
    )
    o_ref, lse_ref = naive_attention(q, k, v, causal=causal, return_lse=True)
    assert o.dtype == o_ref.dtype and lse.dtype == lse_ref.dtype
    assert_close(o, o_ref, q, k, v)
    assert_close(lse, lse_ref, q, k, v, quantity="lse")


@given(
    n_q=st.integers(1, 40),
    n_k=st.integers(1, 40),
    block_q=st.integers(1, 50),
    block_k=st.integers(1, 50),
    scale=st.sampled_from([None, 0.3, 2.0]),
)
def test_block_size_and_loop_order_do_not_change_the_answer(n_q, n_k, block_q, block_k, scale):
    rng = np.random.default_rng(n_q * 100 + n_k)
    q, k, v = (rng.standard_normal((n, 8)) for n in (n_q, n_k, n_k))
    ref = flash_attention(q, k, v, block_q=n_q, block_k=n_k, scale=scale, causal=True)
    for loop_order in LOOP_ORDERS:
        o = flash_attention(
            q, k, v, block_q=block_q, block_k=block_k, scale=scale, causal=True, loop_order=loop_order
        )
        np.testing.assert_allclose(o, ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_large_logits_are_finite_and_exact(dtype, loop_order):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 90, 16)) for _ in range(3))
    q = q * (1e4 / np.max(np.abs(q @ np.swapaxes(k, -1, -2) / 4.0)))  # largest logit: 1e4
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    for causal in (False, True):
        o, lse = flash_attention(
            q, k, v, block_q=17, block_k=23, causal=causal, loop_order=loop_order, return_lse=True
        )
        o_ref, lse_ref = naive_attention(q, k, v, causal=causal, return_lse=True)
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(lse))
        assert np.max(np.abs(lse)) > 1e3  # the logits really are large
        assert_close(o, o_ref, q, k, v)
        assert_close(lse, lse_ref, q, k, v, quantity="lse")


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
@pytest.mark.parametrize(("block_q", "block_k"), [(1, 1), (4, 3), (7, 64), (64, 2)])
def test_fully_masked_rows_give_zero_and_minus_inf(loop_order, block_q, block_k):
    rng = np.random.default_rng(2)
    n_q, n_k = 23, 9  # bottom-right causal: the first 14 queries see no key
    q, k, v = rng.standard_normal((n_q, 5)), rng.standard_normal((n_k, 5)), rng.standard_normal((n_k, 3))
    o, lse = flash_attention(
        q, k, v, block_q=block_q, block_k=block_k, causal=True, loop_order=loop_order, return_lse=True
    )
    assert np.all(o[:14] == 0) and np.all(lse[:14] == -np.inf)
    assert np.all(np.isfinite(lse[14:])) and np.all(np.abs(o[14:]).sum(axis=1) > 0)
    o_ref, lse_ref = naive_attention(q, k, v, causal=True, return_lse=True)
    assert_close(o, o_ref, q, k, v)
    assert_close(lse, lse_ref, q, k, v, quantity="lse")


def test_empty_key_set_and_float16_and_broadcast():
    rng = np.random.default_rng(3)
    o, lse = flash_attention(
        rng.standard_normal((2, 4, 3)), np.zeros((2, 0, 3)), np.zeros((2, 0, 5)), return_lse=True
    )
    assert o.shape == (2, 4, 5) and np.all(o == 0) and np.all(lse == -np.inf)
    q, k, v = (
        rng.standard_normal(s).astype(np.float16) for s in [(3, 1, 10, 8), (1, 2, 12, 8), (3, 2, 12, 4)]
    )
    o = flash_attention(q, k, v, block_q=3, block_k=5)
    assert o.dtype == np.float16 and o.shape == (3, 2, 10, 4)
    np.testing.assert_allclose(o.astype(np.float32), naive_attention(q, k, v).astype(np.float32), atol=2e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"block_q": 0}, ValueError, "block_q"),
        ({"block_k": -3}, ValueError, "block_k"),
        ({"block_q": 2.5}, TypeError, "block_q"),
        ({"block_k": True}, TypeError, "block_k"),
        ({"loop_order": "fa3"}, ValueError, "loop_order must be one of 'fa1', 'fa2', got 'fa3'"),
        ({"scale": float("nan")}, ValueError, "scale"),
        ({"scale": float("inf")}, ValueError, "scale"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, words):
    x = np.ones((4, 2))
    with pytest.raises(error, match=words):
        flash_attention(x, x, x, **kwargs)


def test_bad_arrays_are_named():
    x = np.ones((4, 2))
    with pytest.raises(TypeError, match="q must be a floating-point"):
        flash_attention(np.ones((4, 2), dtype=int), x, x)
    with pytest.raises(ValueError, match="k's last dim"):
        flash_attention(x, np.ones((4, 3)), x)
    with pytest.raises(ValueError, match="v must have as many rows as k"):
        flash_attention(x, x, np.ones((5, 2)))


# --- the tile schedule ----------------------------------------------------------------------------


@given(
    n_q=st.integers(0, 60),
    n_k=st.integers(0, 60),
    block_q=st.integers(1, 20),
    block_k=st.integers(1, 20),
    causal=st.booleans(),
)
def test_tile_grid_skips_exactly_the_tiles_above_the_diagonal(n_q, n_k, block_q, block_k, causal):
    grid = tile_grid(n_q, n_k, block_q, block_k, causal)
    t_r, t_c = n_blocks(n_q, block_q), n_blocks(n_k, block_k)
    assert grid.shape == (t_r, t_c)
    visible = causal_mask(n_q, n_k) if causal else np.ones((n_q, n_k), bool)
    for i in range(t_r):
        rows = slice(*block_range(i, block_q, n_q))
        for j in range(t_c):
            cols = slice(*block_range(j, block_k, n_k))
            assert grid[i, j] == visible[rows, cols].any()
            if grid[i, j] and causal:
                assert tile_needs_mask(i, j, n_q, n_k, block_q, block_k) == (not visible[rows, cols].all())
                np.testing.assert_array_equal(
                    tile_mask(block_range(i, block_q, n_q), block_range(j, block_k, n_k), n_q, n_k),
                    ~visible[rows, cols],
                )
        assert grid[i].sum() == last_col_block(i, n_q, n_k, block_q, block_k, causal) + 1
    for j in range(t_c if n_q else 0):
        assert np.argmax(grid[:, j]) == first_row_block(j, n_q, n_k, block_q, block_k, causal)
        assert grid[-1, j]  # the last query sees every key, so every K/V block is used
    computed, skipped = tile_counts(n_q, n_k, block_q, block_k, causal)
    assert computed == grid.sum() and computed + skipped == t_r * t_c
    assert skipped == 0 or causal


def test_tiles_of_the_notes_example():
    # Q, K, V: 64 x 128, B_r = B_c = 8: 8 x 8 tiles; causal skips the 28 above the diagonal.
    assert tile_counts(64, 64, 8, 8) == (64, 0)
    assert tile_counts(64, 64, 8, 8, causal=True) == (36, 28)
    assert block_range(7, 8, 60) == (56, 60) and n_blocks(60, 8) == 8
    fa1, fa2 = visit_order(64, 64, 8, 8, loop_order="fa1"), visit_order(64, 64, 8, 8, loop_order="fa2")
    assert fa1[:2] == [(0, 0), (1, 0)] and fa2[:2] == [(0, 0), (0, 1)] and sorted(fa1) == sorted(fa2)
    with pytest.raises(ValueError, match="loop_order"):
        visit_order(4, 4, 2, 2, loop_order="FA2")


# --- the trace and the memory hook -----------------------------------------------------------------


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
@pytest.mark.parametrize(
    ("n_q", "n_k", "causal"), [(29, 29, False), (29, 29, True), (31, 17, True), (13, 40, True)]
)
def test_trace_follows_the_schedule_and_ends_at_the_output(loop_order, n_q, n_k, causal):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, n, 6)) for n in (n_q, n_k, n_k))
    block_q, block_k = 8, 5
    trace = []
    o, lse = flash_attention(
        q,
        k,
        v,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        loop_order=loop_order,
        return_lse=True,
        trace=trace,
    )
    grid = tile_grid(n_q, n_k, block_q, block_k, causal)
    assert [(t.i, t.j) for t in trace] == visit_order(n_q, n_k, block_q, block_k, causal, loop_order)
    assert [t.step for t in trace] == list(range(len(trace)))
    assert all(t.skipped == (not grid[t.i, t.j]) and t.loop_order == loop_order for t in trace)
    assert sum(not t.skipped for t in trace) == tile_counts(n_q, n_k, block_q, block_k, causal)[0]
    final = {}
    for t in trace:
        if not t.skipped:
            assert t.m.shape == (2, t.rows[1] - t.rows[0]) and t.o.shape == (2, t.rows[1] - t.rows[0], 6)
            final[t.i] = t
    for t in final.values():  # the last computed visit of each row block holds the answer
        r0, r1 = t.rows
        np.testing.assert_allclose(t.o, o[:, r0:r1], atol=1e-13)
        with np.errstate(divide="ignore"):
            np.testing.assert_allclose(np.where(t.l > 0, t.m + np.log(t.l), -np.inf), lse[:, r0:r1])


def test_the_two_loop_orders_visit_tiles_in_different_orders():
    x = np.ones((20, 4))
    traces = {}
    for loop_order in LOOP_ORDERS:
        traces[loop_order] = []
        flash_attention(x, x, x, block_q=10, block_k=10, loop_order=loop_order, trace=traces[loop_order])
    assert [(t.i, t.j) for t in traces["fa1"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [(t.i, t.j) for t in traces["fa2"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize(("n", "d", "block_q", "block_k"), [(100, 16, 12, 20), (64, 8, 64, 7), (5, 3, 2, 9)])
def test_memory_hook_counts_the_algorithm_lines(n, d, block_q, block_k):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(3))
    t_r, t_c = n_blocks(n, block_q), n_blocks(n, block_k)
    fa1 = MemoryModel()
    flash_attention(q, k, v, block_q=block_q, block_k=block_k, loop_order="fa1", memory=fa1)
    assert fa1.hbm_read_elements == 2 * n * d + t_c * (2 * n * d + 2 * n)  # Algorithm 1, lines 6 and 8
    assert fa1.hbm_write_elements == t_c * (n * d + 2 * n)  # lines 12-13
    fa2 = MemoryModel()
    flash_attention(q, k, v, block_q=block_q, block_k=block_k, loop_order="fa2", memory=fa2)
    assert fa2.hbm_read_elements == n * d + t_r * 2 * n * d
    assert fa2.write_elements == {"O": n * d, "lse": n}
    b_r, b_c = min(block_q, n), min(block_k, n)
    on_chip = 4 * (2 * b_r * d + 2 * b_c * d + b_r * b_c + 2 * b_r)  # Q, O, K, V, S or P, m, l
    assert fa1.sram_peak_bytes == fa2.sram_peak_bytes == on_chip
    assert fa1.held == fa2.held == {}


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_skipped_causal_tiles_are_not_loaded(loop_order):
    n_q, n_k, d, block_q, block_k = 37, 30, 4, 6, 7
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((n, d)) for n in (n_q, n_k, n_k))
    memory = MemoryModel()
    flash_attention(
        q, k, v, block_q=block_q, block_k=block_k, causal=True, loop_order=loop_order, memory=memory
    )
    grid = tile_grid(n_q, n_k, block_q, block_k, causal=True)
    rows = np.diff([block_range(i, block_q, n_q) for i in range(grid.shape[0])]).ravel()
    cols = np.diff([block_range(j, block_k, n_k) for j in range(grid.shape[1])]).ravel()
    assert 0 < grid.sum() < grid.size
    if loop_order == "fa2":  # K_j, V_j per computed tile; Q_i per query block that sees a key
        assert memory.read_elements["K"] == d * (grid * cols).sum()
        assert memory.read_elements["Q"] == d * rows[grid.any(axis=1)].sum()
    else:  # Q_i, O_i, l_i, m_i per computed tile; K_j, V_j once
        assert memory.read_elements["K"] == d * n_k
        assert memory.read_elements["Q"] == d * (grid * rows[:, None]).sum()
        assert memory.write_elements["l"] == (grid * rows[:, None]).sum()
    assert math.isclose(memory.read_elements["V"], memory.read_elements["K"])


@pytest.mark.parametrize(("n_q", "n_k", "causal"), [(70, 70, False), (70, 30, True), (9, 70, True)])
def test_threads_over_query_blocks_give_the_same_answer(n_q, n_k, causal):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, n, 8)) for n in (n_q, n_k, n_k))
    one = flash_attention(q, k, v, block_q=8, block_k=16, causal=causal, return_lse=True)
    three = flash_attention(q, k, v, block_q=8, block_k=16, causal=causal, return_lse=True, workers=3)
    for a, b in zip(one, three, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"workers": 0}, "workers must be a positive integer"),
        ({"workers": 2.0}, "workers must be a positive integer"),
        ({"workers": 2, "loop_order": "fa1"}, "workers > 1 needs loop_order='fa2'"),
        ({"workers": 2, "memory": MemoryModel()}, "memory counting and trace need workers=1"),
        ({"workers": 2, "trace": []}, "memory counting and trace need workers=1"),
    ],
)
def test_bad_workers_are_explained(kwargs, words):
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match=words):
        flash_attention(x, x, x, **kwargs)


@given(
    st.integers(1, 20),
    st.integers(1, 20),
    st.integers(1, 7),
    st.integers(1, 7),
    st.booleans(),
    st.sampled_from(["fa1", "fa2"]),
)
def test_the_trace_covers_each_visible_score_exactly_once(n_q, n_k, block_q, block_k, causal, loop_order):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((n_q, 3)), rng.standard_normal((n_k, 3)), rng.standard_normal((n_k, 2))
    trace = []
    flash_attention(
        q, k, v, block_q=block_q, block_k=block_k, causal=causal, loop_order=loop_order, trace=trace
    )
    seen = coverage(trace, n_q, n_k)
    visible = causal_mask(n_q, n_k) if causal else np.ones((n_q, n_k), bool)
    assert np.all(seen[visible] == 1) and np.all(seen <= 1)  # masked entries of computed tiles count once too


# --- chapter 2's whole-forward exercise: each likely mistake gets its own message -----------------
def _forward(q, k, v, block_q, block_k, causal, bug=None):
    """The exercise's forward with one deliberate ``bug`` (None: correct)."""
    from flashlab.exercises.flash import fa2_tile_update

    n_q, n_k = len(q), len(k)
    stop_q = (n_q // block_q) * block_q if bug == "drop_ragged" else n_q
    o, lse = np.zeros((n_q, v.shape[1]), q.dtype), np.full(n_q, -np.inf, q.dtype)
    for r0 in range(0, stop_q, block_q):
        rows = np.arange(r0, min(r0 + block_q, n_q))
        m, l, acc = np.full(len(rows), -np.inf), np.zeros(len(rows)), np.zeros((len(rows), v.shape[1]))  # noqa: E741
        for c0 in range(0, n_k, block_k):
            cols = np.arange(c0, min(c0 + block_k, n_k))
            s = q[rows] @ k[cols].T / (1.0 if bug == "no_scale" else math.sqrt(q.shape[1]))
            offset = 0 if bug == "top_left" else n_k - n_q
            if causal and bug != "no_mask":
                s = np.where(cols[None, :] <= rows[:, None] + offset, s, -np.inf)
            m, l, acc = fa2_tile_update(m, l, acc, s, v[cols])  # noqa: E741
        with np.errstate(all="ignore"):
            if bug == "nan_rows":
                o[rows] = acc / l[:, None]
            elif bug == "no_divide":
                o[rows] = acc
            else:
                o[rows] = np.where(l[:, None] > 0, acc / np.where(l > 0, l, 1)[:, None], 0)
            lse[rows] = m if bug == "lse_is_m" else np.where(l > 0, m + np.log(l), -np.inf)
    return o, lse


@pytest.mark.parametrize(
    ("bug", "words"),
    [
        ("drop_ragged", "last, partial block is missing"),
        ("no_mask", "causal mask was not applied"),
        ("top_left", "aligned top-left"),
        ("nan_rows", "rows that see no key"),
        ("no_divide", "never divided by l"),
        ("no_scale", "not scaled"),
        ("lse_is_m", "lse is not"),
    ],
)
def test_fa2_forward_exercise_names_each_likely_mistake(bug, words):
    from flashlab import check

    check.check("fa2_forward", lambda *a: _forward(*a))  # the correct one passes
    with pytest.raises(check.Mistake, match=words):
        check.check("fa2_forward", lambda *a: _forward(*a, bug=bug))
