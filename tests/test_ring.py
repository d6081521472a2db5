"""Ring attention: the sharding and the per-shard states in-process, then real gloo processes (P=2, 3)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashlab.attention import naive_attention
from flashlab.backward import naive_attention_backward
from flashlab.online_softmax import empty_state, merge, state_lse
from flashlab.ring import (
    LAYOUTS,
    causal_work,
    launch,
    ring_backward_bytes,
    ring_bytes,
    run_ring,
    shard,
    shard_gradients,
    shard_positions,
    shard_runs,
    shard_state,
    unshard,
)
from flashlab.tolerance import attention_backward_bound, attention_bound, check_close


def problem(n, d, seed, lead=(2,), dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple((rng.standard_normal(lead + (n, d)) * s).astype(dtype) for s in (3.0, 1.0, 1.0))


def check(o, lse, q, k, v, causal):
    o_ref, lse_ref = naive_attention(
        *(x.astype(np.float64) for x in (q, k, v)), causal=causal, return_lse=True
    )
    check_close(o, o_ref, attention_bound(q, k, v), "o")
    check_close(lse, lse_ref, attention_bound(q, k, v, quantity="lse"), "lse")


@given(world=st.integers(1, 6), parts=st.integers(1, 5), layout=st.sampled_from(["contiguous", "zigzag"]))
def test_shard_then_unshard_is_the_identity(world, parts, layout):
    x = np.arange(2 * (2 * world * parts) * 3, dtype=float).reshape(2, -1, 3)
    shards = [shard(x, world, r, layout) for r in range(world)]
    assert all(s.shape == (2, x.shape[1] // world, 3) for s in shards)
    np.testing.assert_array_equal(unshard(shards, layout), x)


@given(
    world=st.integers(1, 5),
    chunk=st.integers(1, 6),
    layout=st.sampled_from(["contiguous", "zigzag"]),
    causal=st.booleans(),
    seed=st.integers(0, 99),
)
def test_merging_every_shards_state_is_attention_and_work_matches_closed_form(
    world, chunk, layout, causal, seed
):
    """What every rank computes over the P steps of the ring, run here in one process."""
    n = 2 * world * chunk
    q, k, v = problem(n, 8, seed)
    outs, lses = [], []
    for rank in range(world):
        state, work = empty_state((2, n // world), 8, np.float32), 0
        for source in range(world):
            part, scores = shard_state(
                shard(q, world, rank, layout), shard_runs(n, world, rank, layout),
                shard(k, world, source, layout), shard(v, world, source, layout),
                shard_runs(n, world, source, layout), 8**-0.5, causal,
            )  # fmt: skip
            state, work = merge(state, part), work + scores
        assert work == (causal_work(n, world, layout)[rank] if causal else (n // world) * n)
        outs.append(state.o)
        lses.append(state_lse(state)[..., None])
    check(unshard(outs, layout), unshard(lses, layout)[..., 0], q, k, v, causal)


def check_grads(grads, q, k, v, do, causal):
    ref = naive_attention_backward(*(x.astype(np.float64) for x in (q, k, v, do)), causal=causal)
    bounds = attention_backward_bound(q, k, v, do, causal=causal, dtype=np.float32)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref, strict=True):
        check_close(g, g_ref, bounds[name], name)


@given(
    world=st.integers(1, 4),
    chunk=st.integers(1, 5),
    d_v=st.integers(1, 9),
    layout=st.sampled_from(["contiguous", "zigzag"]),
    causal=st.booleans(),
    seed=st.integers(0, 99),
)
def test_every_ranks_contributions_sum_to_the_gradients(world, chunk, d_v, layout, causal, seed):
    """What the backward's ring adds up, in one process: dQ per rank, dK/dV per shard over all ranks."""
    n = 2 * world * chunk
    q, k, _ = problem(n, 8, seed)
    v, do = problem(n, d_v, seed + 1)[1:]
    o, lse = naive_attention(q, k, v, causal=causal, return_lse=True)
    delta = np.sum(do * o, axis=-1)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for rank in range(world):
        mine = shard_positions(n, world, rank, layout)
        for source in range(world):
            theirs = shard_positions(n, world, source, layout)
            dq_s, dk_s, dv_s, _ = shard_gradients(
                q[:, mine], do[:, mine], lse[:, mine], delta[:, mine], shard_runs(n, world, rank, layout),
                k[:, theirs], v[:, theirs], shard_runs(n, world, source, layout), 8**-0.5, causal,
            )  # fmt: skip
            dq[:, mine] += dq_s
            dk[:, theirs] += dk_s
            dv[:, theirs] += dv_s
    check_grads((dq, dk, dv), q, k, v, do, causal)


def test_zigzag_balances_what_contiguous_sharding_leaves_uneven():
    contiguous, zigzag = causal_work(4096, 4, "contiguous"), causal_work(4096, 4, "zigzag")
    assert list(contiguous // contiguous[0]) == [1, 2, 3, 4]  # rank r computes r + 1 blocks
    assert len(set(zigzag)) == 1 and zigzag.sum() < contiguous.sum()
    assert contiguous.max() / contiguous.mean() == 2 * 4 / (4 + 1)


@pytest.mark.parametrize(
    ("n", "world", "layout"), [(10, 3, "contiguous"), (12, 4, "zigzag"), (9, 0, "zigzag")]
)
def test_sequence_not_divisible_is_refused_before_any_process_starts(n, world, layout):
    q = np.zeros((n, 4), np.float32)
    with pytest.raises(ValueError, match="must be a multiple of|positive integer"):
        run_ring(q, q, q, world=world, layout=layout)


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_processes_give_attention_and_its_gradients_and_count_their_bytes(world):
    q, k, v = problem(12 * world, 16, seed=world)
    do = problem(12 * world, 16, seed=world + 10)[1]
    results = run_ring(q, k, v, do, world=world, causal=True, layout=LAYOUTS, timeout=120)  # one group
    for layout, result in results.items():
        check(result.o, result.lse, q, k, v, causal=True)
        check_grads(result.grads, q, k, v, do, causal=True)
        for rank, steps in enumerate(result.backward_stats):
            assert [s.source for s in steps] == [(rank - t) % world for t in range(world)]
            assert sum(s.bytes_sent for s in steps) == ring_backward_bytes(
                12 * world, 16, 16, world, 4, batch=2
            )
            assert sum(s.scores for s in steps) == causal_work(12 * world, world, layout)[rank]
        for rank, steps in enumerate(result.stats):
            assert [s.source for s in steps] == [(rank - t) % world for t in range(world)]  # around the ring
            assert sum(s.bytes_sent for s in steps) == ring_bytes(12 * world, 16, 16, world, 4, batch=2)
            assert sum(s.bytes_received for s in steps) == ring_bytes(12 * world, 16, 16, world, 4, batch=2)
            assert sum(s.scores for s in steps) == causal_work(12 * world, world, layout)[rank]


def test_mismatched_shards_are_a_value_error_on_every_rank():
    q, k, v = problem(8, 4, seed=0)
    shards = [(q[:, :4], k[:, :4], v[:, :4]), (q[:, 4:7], k[:, 4:7], v[:, 4:7])]
    with pytest.raises(ValueError, match="shards mismatch"):
        launch([(shards, {})], timeout=120)


def test_a_rank_that_dies_is_reported_not_waited_for():
    q, k, v = problem(8, 4, seed=0)
    with pytest.raises(RuntimeError, match="rank 1 died"):
        run_ring(q, k, v, world=2, timeout=120, fail_rank=1)
