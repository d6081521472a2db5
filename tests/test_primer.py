"""Chapter 4's primer kernels, run in the simulator over recorded arrays: each does what its picture
says, and each measure drawn from the records (sectors, bank passes, races, owners) is right."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashlab import tolerance
from flashlab.cuda import primer


@given(st.integers(1, 40), st.integers(1, 16))
def test_global_index_writes_each_element_once_by_its_thread(n, block):
    out = np.full(n, -1.0, np.float32)
    grid = math.ceil(n / block)
    t = primer.trace(primer.global_index, (grid,), (block,), out=out)
    writes = t.of("out", "w")
    assert np.array_equal(out, np.arange(n))
    assert sorted(a.index for a in writes) == list(range(n))  # once each; idle threads write nothing
    assert all(a.index == a.block[0] * block + a.thread for a in writes)
    assert np.array_equal(primer.owner_map(writes, (n,), block_threads=block), np.arange(n))


@pytest.mark.parametrize(("by", "divergent"), [("lane", 2), ("warp", 0)])
def test_branch_diverges_only_when_lanes_of_a_warp_disagree(by, divergent):
    out = np.zeros(2 * primer.WARP, np.float32)
    primer.trace(primer.branch_source(by), (1,), (2 * primer.WARP,), out=out)
    paths = out.reshape(2, primer.WARP)
    assert set(np.unique(paths)) == {1.0, 2.0}
    assert sum(len(np.unique(w)) > 1 for w in paths) == divergent


def test_reverse_with_barrier_reads_only_written_slots():
    x = np.arange(3 * primer.BLOCK, dtype=np.float32)
    out = np.zeros_like(x)
    t = primer.trace(primer.reverse_source(barrier=True), (3,), (primer.BLOCK,), x=x, out=out)
    assert np.array_equal(out, x.reshape(3, -1)[:, ::-1].ravel())
    assert primer.early_reads(t.of("shared0")) == []


def test_early_reads_finds_a_read_before_the_write():
    w = primer.Access("s", "w", (0, 0), 1, 0, 5, seq=3)
    r_early = primer.Access("s", "r", (0, 0), 0, 0, 5, seq=2)
    r_late = primer.Access("s", "r", (0, 0), 2, 0, 5, seq=4)
    other_block = primer.Access("s", "r", (1, 0), 0, 0, 5, seq=1)
    assert primer.early_reads([r_early, w, r_late, other_block]) == [r_early]


@pytest.mark.parametrize(("by_column", "sectors"), [(False, 4), (True, 32)])
def test_coalesced_warp_touches_four_sectors_strided_thirty_two(by_column, sectors):
    x = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    out = np.zeros(x.size, np.float32)
    t = primer.trace(primer.read_matrix, (1,), (32,), x=x, out=out, by_column=by_column)
    assert np.array_equal(out[:32], (x.T if by_column else x).ravel()[:32])
    assert primer.sectors_per_request(t.of("x", "r")) == [sectors]


@given(st.integers(0, 8))
def test_bank_passes_are_gcd_of_pad_and_32(pad):
    rng = np.random.default_rng(pad)
    x = rng.standard_normal((32, 32)).astype(np.float32)
    out = np.zeros(32, np.float32)
    t = primer.trace(primer.row_sums_source(pad), (1,), (32,), x=x, out=out)
    assert set(primer.bank_conflicts(t.of("shared0", "r"))) == {math.gcd(pad, 32)}
    assert set(primer.bank_conflicts(t.of("shared0", "w"))) == {1}
    u = tolerance.unit_roundoff(np.float32)
    bound = tolerance.Bound(tolerance.gamma(32, u) * float(np.abs(x).sum(1).max()), "32-term sums")
    tolerance.check_close(out, x.astype(np.float64).sum(1), bound, "row sums")


@given(st.sampled_from([(1, 1), (2, 4), (4, 2), (2, 2)]), st.integers(1, 6))
def test_micro_tile_reads_tm_plus_tn_values_per_step(tile, k):
    tm, tn = tile
    rng = np.random.default_rng(k)
    a = rng.standard_normal((k, 8)).astype(np.float32)
    b = rng.standard_normal((k, 8)).astype(np.float32)
    c = np.zeros((8, 8), np.float32)
    threads = 64 // (tm * tn)
    t = primer.trace(primer.micro_tile_source(tm, tn), (1,), (threads,), a=a, b=b, c=c)
    u = tolerance.unit_roundoff(np.float32)
    bound = tolerance.Bound(tolerance.gamma(k, u) * float((np.abs(a).T @ np.abs(b)).max()), f"{k}-term sums")
    tolerance.check_close(c, a.T.astype(np.float64) @ b, bound, "a^T b")
    reads = t.of("a", "r") + t.of("b", "r")
    assert len(reads) == threads * k * (tm + tn)
    owners = primer.owner_map(t.of("c", "w"), (8, 8))
    assert sorted(np.bincount(owners.ravel())) == [tm * tn] * threads


def test_register_tiled_owners_follow_the_kernels_layout():
    o = primer.register_tiled_owners()
    tiles = o.tiles
    rows, keys, tm, g = tiles["rows"], tiles["keys"], tiles["tm"], tiles["g"]
    r_groups = rows // tm
    r, j = np.indices((rows, keys))
    assert np.array_equal(o.s, (r % r_groups) * g + j % g)  # thread (rg, cg) = rows rg + R a, keys cg + g b
    w = min(4, 16 // g)
    r, c = np.indices(o.o.shape)
    assert np.array_equal(o.o, (r % r_groups) * g + (c // w) % g)
    assert (o.s >= 0).all() and (o.o >= 0).all()


@given(st.sampled_from([32, 64, 128, 256, 512, 1024]), st.integers(1, 255), st.integers(0, 120_000))
def test_occupancy_formula_matches_filling_the_sm_block_by_block(threads, registers, shared):
    occ = primer.occupancy(threads, registers, shared)
    assert occ.blocks == primer.fill_sm(threads, registers, shared)
    assert occ.limits[occ.binding] == occ.blocks
    assert 0 <= occ.fraction <= 1


def test_occupancy_refuses_impossible_blocks_by_name():
    with pytest.raises(ValueError, match="threads"):
        primer.occupancy(2048, 32, 0)
    with pytest.raises(ValueError, match="registers"):
        primer.occupancy(128, 300, 0)


def test_timing_needs_a_gpu():
    if primer.device.MODE == "gpu":
        pytest.skip("on a GPU the timings run (the notebook shows them)")
    assert primer.time_on_gpu(primer.global_index, (1,), (4,), np.zeros(4, np.float32)) is None
    assert primer.gpu_timings() is None
