"""The course's drawn diagrams: each renders to PNG and draws the numbers the code uses."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flashlab import hardware, tiles, traffic  # noqa: E402
from flashlab.cuda import primer  # noqa: E402
from flashlab.plots import diagrams  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@pytest.mark.parametrize("gpu", sorted(hardware.specs()))
def test_memory_hierarchy_shows_the_hardware_file(gpu):
    fig, ax = plt.subplots()
    levels = diagrams.memory_hierarchy(ax, gpu)
    spec = hardware.spec(gpu)
    shared, hbm = levels[1], levels[2]
    assert (
        shared["per_sm"] == hardware.shared_memory_bytes(gpu)
        and shared["total"] == hardware.shared_memory_bytes(gpu) * spec["sm_count"]
    )
    assert hbm["total"] == max(spec["hbm_capacity_bytes"]) and hbm["bandwidth"] == max(
        spec["hbm_bytes_per_s"]
    )
    assert levels[0]["per_sm"] == 4 * primer.SM90["registers"]
    text = " ".join(t.get_text() for t in ax.texts)
    assert f"{spec['sm_count']} SMs" in text and "HBM" in text
    # the title's claim: HBM is the largest level (the registers, in all, outsize shared memory)
    assert "HBM holds the most" in ax.get_title() and max(levels, key=lambda lv: lv["total"]) is hbm
    assert _png(fig).startswith(b"\x89PNG")


@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 9), st.integers(1, 9), st.booleans())
def test_outer_steps_add_up_to_algorithm_1(n_q, n_k, block_q, block_k, causal):
    steps = [
        diagrams.outer_step_traffic(j, n_q, n_k, 3, block_q=block_q, block_k=block_k, causal=causal)
        for j in range(tiles.n_blocks(n_k, block_k))
    ]
    total = sum(steps[1:], steps[0])
    want = traffic.fa1_forward(n_q, n_k, 3, block_q=block_q, block_k=block_k, causal=causal)
    assert total == want


def test_outer_step_draws_the_steps_counts_and_refuses_a_step_that_does_not_exist():
    fig, ax = plt.subplots()
    step = diagrams.outer_step(ax, 8, 4, block_q=2, block_k=4, j=1, i=2)
    assert step == diagrams.outer_step_traffic(1, 8, 8, 4, block_q=2, block_k=4)
    assert any(f"{step.read_elements} read" in t.get_text() for t in ax.texts)
    assert _png(fig).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="j, i"):
        diagrams.outer_step(ax, 8, 4, block_q=2, block_k=4, j=2, i=0)


def test_tile_owners_colour_each_element_by_its_recorded_thread():
    owners = primer.register_tiled_owners()
    fig, axes = plt.subplots(1, 3)
    diagrams.tile_owners(axes[0], axes[1], owners, axes[2], {"tiled": 2.0, "register_tiled": 1.0})
    shown = [int(t.get_text()) for t in axes[0].texts]
    assert shown == owners.s.ravel().tolist()
    assert [b.get_height() for b in axes[2].patches] == [2.0, 1.0]
    assert _png(fig).startswith(b"\x89PNG")


@settings(max_examples=10)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.integers(1, 4), st.booleans())
def test_backward_flow_counts_the_atomic_adders_of_each_dq_block(n_q, n_k, block_q, block_k, causal):
    fig, ax = plt.subplots()
    adders = diagrams.backward_flow(ax, n_q, n_k, block_q=block_q, block_k=block_k, j=0, causal=causal)
    grid = tiles.tile_grid(n_q, n_k, block_q, block_k, causal)
    assert np.array_equal(adders, grid.sum(axis=1))
    plt.close(fig)


def test_primer_pictures_draw_the_recorded_accesses():
    x = np.arange(primer.BLOCK, dtype=np.float32)
    run = primer.trace(primer.reverse_source(), (1,), (primer.BLOCK,), x=x, out=np.zeros_like(x))
    fig, axes = plt.subplots(1, 3)
    steps = [("x", "r"), ("shared0", "w"), ("shared0", "r"), ("out", "w")]
    paths = diagrams.access_flow(axes[0], run, steps, primer.BLOCK)
    last = primer.BLOCK - 1
    assert paths == [[t, t, last - t, t] for t in range(primer.BLOCK)]
    labels = diagrams.thread_map(axes[1], np.array([[0, 1], [-1, 3]]))
    assert labels == ["0", "1", "3"]  # -1 (no thread) is left blank
    occ = primer.occupancy(256, 128, 92160)
    assert diagrams.occupancy_limits(axes[2], occ) == occ.limits
    assert _png(fig).startswith(b"\x89PNG")


@pytest.mark.parametrize("pad", [0, 1, 2])
def test_bank_passes_stacks_each_banks_lanes(pad):
    x = np.ones((32, 32), np.float32)
    run = primer.trace(primer.row_sums_source(pad), (1,), (32,), x=x, out=np.zeros(32, np.float32))
    request = next(iter(primer.warp_requests(run.of("shared0", "r")).values()))
    fig, ax = plt.subplots()
    assert diagrams.bank_passes(ax, request) == primer.bank_conflicts([*request])[0] == [32, 1, 2][pad]
    assert len(ax.texts) == 32  # every lane drawn once
    plt.close(fig)
