"""Paged KV cache: decode attention over pages equals attention over the contiguous keys; fragmentation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlab.attention import naive_attention
from flashlab.paged import FREE, PagedKVCache, paged_attention, simulate
from flashlab.tolerance import attention_bound, check_close


@st.composite
def filled_caches(draw):
    """A cache holding B sequences appended in random interleaved chunks (so their pages interleave)."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    h_kv, group, d, d_v = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 8)),
        draw(st.integers(1, 8)),
    )
    page_size, batch = draw(st.integers(1, 9)), draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    need = sum(-(-n // page_size) for n in lengths)
    cache = PagedKVCache(need + draw(st.integers(1, 3)), page_size, h_kv, d, d_v, dtype)
    chunks = [
        (b, c)
        for b, n in enumerate(lengths)
        for c in np.diff(np.r_[0, np.sort(rng.integers(0, n + 1, 2)), n])
    ]
    for b in range(batch):
        cache.append(b, np.zeros((h_kv, 0, d)), np.zeros((h_kv, 0, d_v)))
    for b, c in (chunks[i] for i in rng.permutation(len(chunks))):
        cache.append(b, rng.standard_normal((h_kv, c, d)), rng.standard_normal((h_kv, c, d_v)))
    spread = draw(st.sampled_from([0.1, 1.0, 10.0]))
    q = (rng.standard_normal((batch, h_kv * group, d)) * spread).astype(dtype)
    return cache, q


@settings(max_examples=40, deadline=None)
@given(problem=filled_caches())
def test_attention_over_pages_equals_attention_over_the_contiguous_keys(problem):
    cache, q = problem
    seqs = list(range(q.shape[0]))
    tables, lengths = cache.block_tables(seqs)
    o, lse = paged_attention(q, cache.k, cache.v, tables, lengths, return_lse=True)
    group = q.shape[1] // cache.k.shape[1]
    for b in seqs:
        k, v = (np.repeat(x, group, axis=0) for x in cache.contiguous(b))
        assert k.shape[1] == lengths[b]
        qb = q[b, :, None].astype(np.float64)
        o_ref, lse_ref = naive_attention(qb, k.astype(np.float64), v.astype(np.float64), return_lse=True)
        check_close(o[b], o_ref[:, 0], attention_bound(q[b, :, None], k, v), f"o of sequence {b}")
        check_close(lse[b], lse_ref[:, 0], attention_bound(q[b, :, None], k, v, quantity="lse"), "lse")


def test_pages_are_taken_as_needed_and_reused_after_release():
    cache = PagedKVCache(4, 3, 1, 2)
    cache.append("a", np.ones((1, 4, 2)), np.ones((1, 4, 2)))  # 4 tokens: 2 pages
    cache.append("b", np.ones((1, 1, 2)), np.ones((1, 1, 2)))
    assert cache.tables == {"a": [0, 1], "b": [2]} and cache.slots() == (5, 9)
    cache.release("a")
    cache.append("b", np.ones((1, 3, 2)), np.ones((1, 3, 2)))  # b's second page is a's old page 0
    assert cache.tables["b"] == [2, 0] and cache.free == [1, 3]
    with pytest.raises(MemoryError, match="full"):
        cache.append("c", np.ones((1, 7, 2)), np.ones((1, 7, 2)))


@pytest.mark.parametrize(
    ("tables", "lengths", "words"),
    [
        ([[0, 5]], [4], r"block_tables\[0, 1\]=5 points past the cache"),
        ([[0, FREE]], [4], r"block_tables\[0, 1\]=-1 points past the cache"),
        ([[0]], [4], "needs 2 pages"),
        ([[0.0, 1.0]], [4], "integers"),
        ([[0, 1]], [-1], "lengths"),
    ],
)
def test_a_block_table_pointing_past_the_cache_is_refused_by_name(tables, lengths, words):
    cache = PagedKVCache(3, 3, 1, 2)
    with pytest.raises(ValueError, match=words):
        paged_attention(np.ones((1, 1, 2)), cache.k, cache.v, np.array(tables), np.array(lengths))


def test_unused_block_table_entries_are_not_read():
    cache = PagedKVCache(2, 4, 1, 2)
    cache.append(0, np.ones((1, 3, 2)), np.full((1, 3, 2), 5.0))
    o = paged_attention(np.ones((1, 1, 2)), cache.k, cache.v, np.array([[0, 99]]), np.array([3]))
    np.testing.assert_array_equal(o, np.full((1, 1, 2), 5.0))


@given(
    prompts=st.lists(st.integers(1, 60), min_size=1, max_size=12),
    data=st.data(),
    page_size=st.integers(1, 16),
)
def test_a_simulated_batch_wastes_at_most_a_page_tail_per_request(prompts, data, page_size):
    outputs = data.draw(st.lists(st.integers(0, 60), min_size=len(prompts), max_size=len(prompts)))
    num_pages = -(-max(p + o for p, o in zip(prompts, outputs, strict=True)) // page_size) + data.draw(
        st.integers(0, 20)
    )
    steps = simulate(prompts, outputs, num_pages=num_pages, page_size=page_size, max_len=120)
    for s in steps:
        assert s["used"] <= s["paged"] <= s["used"] + s["running"] * (page_size - 1)
        assert s["paged"] <= num_pages * page_size
        assert s["used"] <= s["contiguous"]
    assert steps[-1]["running"] == 0 and steps[-1]["used"] == 0  # every request finished


def test_a_request_larger_than_the_cache_is_refused():
    with pytest.raises(ValueError, match="needs more than"):
        simulate([10], [5], num_pages=2, page_size=4, max_len=20)
