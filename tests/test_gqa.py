"""Grouped-query attention: K/V with fewer heads than Q, against torch SDPA (enable_gqa), and its traffic."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlab.flash import flash_attention
from flashlab.inputs import causal_mask
from flashlab.memory import MemoryModel
from flashlab.tolerance import attention_bound, check_close
from flashlab.traffic import fa1_forward, fa2_forward, grouped


@st.composite
def gqa_problems(draw, max_n=60):
    """(q, k, v) with q (b, h_kv g, N_q, d), k and v (b, h_kv, N_k, d)."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    b, h_kv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    n_q, n_k, d, d_v = (draw(st.integers(1, m)) for m in (max_n, max_n, 16, 16))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from([0.1, 1.0, 10.0]))
    q = (rng.standard_normal((b, h_kv * g, n_q, d)) * spread).astype(dtype)
    k = rng.standard_normal((b, h_kv, n_k, d)).astype(dtype)
    v = rng.standard_normal((b, h_kv, n_k, d_v)).astype(dtype)
    return q, k, v


@settings(max_examples=40, deadline=None)
@given(
    problem=gqa_problems(),
    causal=st.booleans(),
    loop_order=st.sampled_from(["fa1", "fa2"]),
    block_q=st.integers(1, 40),
    block_k=st.integers(1, 40),
)
def test_gqa_matches_torch_sdpa_enable_gqa(problem, causal, loop_order, block_q, block_k):
    q, k, v = problem
    n_q, n_k = q.shape[-2], k.shape[-2]
    o = flash_attention(q, k, v, causal=causal, loop_order=loop_order, block_q=block_q, block_k=block_k)
    q64, k64, v64 = (torch.from_numpy(np.asarray(x, np.float64)) for x in (q, k, v))
    visible = causal_mask(n_q, n_k) if causal else np.ones((n_q, n_k), bool)  # bottom-right, as flashlab
    o_ref = F.scaled_dot_product_attention(
        q64, k64, v64, attn_mask=torch.from_numpy(visible), enable_gqa=True
    ).numpy()
    seen = visible.any(axis=1)  # SDPA gives nan for a row that sees no key; flashlab gives 0
    # each query head against its own K/V head: the tolerance of the repeated K/V is the same problem's
    k_rep, v_rep = (np.repeat(x, q.shape[1] // k.shape[1], axis=1) for x in (k, v))
    check_close(o[..., seen, :], o_ref[..., seen, :], attention_bound(q, k_rep, v_rep), "o")
    assert np.all(o[..., ~seen, :] == 0)


@settings(max_examples=30, deadline=None)
@given(
    problem=gqa_problems(max_n=40),
    causal=st.booleans(),
    block_q=st.integers(1, 30),
    block_k=st.integers(1, 30),
)
def test_kv_are_read_once_per_group(problem, causal, block_q, block_k):
    q, k, v = problem
    (b, h_q, n_q, d), (h_kv, n_k, d_v) = q.shape, v.shape[1:]
    group = h_q // h_kv
    kw = dict(block_q=block_q, block_k=block_k, causal=causal)
    for loop_order, closed in (("fa2", fa2_forward), ("fa1", fa1_forward)):
        memory = MemoryModel()
        flash_attention(q, k, v, memory=memory, loop_order=loop_order, **kw)
        per_head = closed(n_q, n_k, d, d_v, batch=b * h_q, **kw)
        assert memory.traffic() == grouped(per_head, group), loop_order
        assert memory.read_elements["K"] * group == per_head.reads["K"]


def test_gqa_equals_repeating_kv_heads_and_mqa_is_one_kv_head():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 6, 9, 8))
    for h_kv in (1, 2, 3, 6):
        k, v = rng.standard_normal((2, h_kv, 7, 8)), rng.standard_normal((2, h_kv, 7, 5))
        o = flash_attention(q, k, v, block_q=4, block_k=3)
        rep = 6 // h_kv
        o_ref = flash_attention(q, np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1), block_q=4, block_k=3)
        check_close(o, o_ref, attention_bound(q, np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)), "o")


@pytest.mark.parametrize(
    ("q_heads", "k_heads", "v_heads", "words"),
    [(6, 4, 4, "multiple of h_kv"), (5, 2, 2, "multiple of h_kv"), (6, 3, 2, "as many heads")],
)
def test_head_counts_that_do_not_group_are_refused_by_name(q_heads, k_heads, v_heads, words):
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((q_heads, 5, 4)), rng.standard_normal((k_heads, 5, 4))
    with pytest.raises(ValueError, match=words):
        flash_attention(q, k, rng.standard_normal((v_heads, 5, 4)))


def test_grouped_refuses_a_group_that_does_not_divide_the_reads():
    with pytest.raises(ValueError, match="group=2"):  # 3 query heads cannot share K/V in pairs
        grouped(fa2_forward(5, 5, 1, block_q=5, block_k=5, batch=3), 2)
