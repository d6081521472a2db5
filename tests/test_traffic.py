"""Counted HBM traffic equals the closed forms exactly; SRAM accounting; Theorem 2's trends."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flashlab  # noqa: F401  (before numba)
from flashlab import traffic
from flashlab.attention import naive_attention
from flashlab.flash import flash_attention
from flashlab.memory import MemoryModel, SRAMOverflow
from flashlab.tiles import tile_grid
from tests.strategies import attention_problems

blocks = st.integers(3, 80)


def counted(fn, q, k, v, **kw) -> MemoryModel:
    memory = MemoryModel()
    fn(q, k, v, memory=memory, **kw)
    return memory


def sizes(q, k, v):
    """(n_q, n_k, d, d_v, batch) of a problem, batch = the broadcast leading dims."""
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], math.prod(lead)


@given(attention_problems(max_n=120), blocks, blocks, st.sampled_from(["fa1", "fa2"]))
def test_counted_flash_traffic_equals_closed_form(problem, block_q, block_k, loop_order):
    q, k, v, causal = problem
    n_q, n_k, d, d_v, batch = sizes(q, k, v)
    memory = counted(
        flash_attention, q, k, v, block_q=block_q, block_k=block_k, causal=causal, loop_order=loop_order
    )
    expected = traffic.forward_traffic(
        loop_order, n_q, n_k, d, d_v, block_q=block_q, block_k=block_k, causal=causal, batch=batch
    )
    assert memory.traffic() == expected
    assert memory.hbm_read_bytes == expected.read_elements * q.dtype.itemsize
    assert memory.hbm_write_bytes == expected.write_elements * q.dtype.itemsize


@given(attention_problems(max_n=120))
def test_counted_standard_traffic_equals_algorithm_0(problem):
    q, k, v, causal = problem
    n_q, n_k, d, d_v, batch = sizes(q, k, v)
    memory = counted(naive_attention, q, k, v, causal=causal)
    assert memory.traffic() == traffic.standard_forward(n_q, n_k, d, d_v, batch=batch)
    assert memory.traffic() == traffic.forward_traffic("standard", n_q, n_k, d, d_v, batch=batch)


@pytest.mark.parametrize("n", [1, 64, 100, 257])
@pytest.mark.parametrize("block", [16, 64, 300])
def test_square_closed_forms_are_the_papers(n, block):
    """Algorithm 1: reads 2Nd + T_c(2Nd + 2N), writes T_c(Nd + 2N); Algorithm 0: 4Nd + 4N^2;
    Algorithm 3: 8Nd + 7N^2; Algorithm 4: reads 2Nd + T_c(4Nd + 2N), writes T_c Nd + 2Nd."""
    d, t_c = 32, -(-n // block)
    fa1 = traffic.fa1_forward(n, n, d, block_q=17, block_k=block)
    assert (fa1.read_elements, fa1.write_elements) == (
        2 * n * d + t_c * (2 * n * d + 2 * n),
        t_c * (n * d + 2 * n),
    )
    assert traffic.standard_forward(n, n, d).elements == 4 * n * d + 4 * n * n
    assert traffic.standard_backward(n, n, d).elements == 8 * n * d + 7 * n * n
    alg4 = traffic.fa1_backward(n, n, d, block_q=17, block_k=block)
    assert (alg4.read_elements, alg4.write_elements) == (
        2 * n * d + t_c * (4 * n * d + 2 * n),
        t_c * n * d + 2 * n * d,
    )
    t_r = -(-n // block)
    fa2 = traffic.fa2_forward(n, n, d, block_q=block, block_k=5)
    assert (fa2.read_elements, fa2.write_elements) == (n * d + t_r * 2 * n * d, n * d + n)


@given(st.integers(1, 200), st.integers(1, 200), st.integers(1, 90), st.integers(1, 90))
def test_causal_work_follows_the_tile_grid(n_q, n_k, block_q, block_k):
    grid = tile_grid(n_q, n_k, block_q, block_k, causal=True)
    rows = np.diff(np.minimum(np.arange(grid.shape[0] + 1) * block_q, n_q))
    cols = np.diff(np.minimum(np.arange(grid.shape[1] + 1) * block_k, n_k))
    assert traffic.computed_rows(n_q, n_k, block_q, block_k, True) == int(rows @ grid.sum(axis=1))
    keys, live = traffic.computed_keys(n_q, n_k, block_q, block_k, True)
    assert keys == int((grid @ cols).sum())
    assert live == int(rows[grid.any(axis=1)].sum())
    assert traffic.computed_rows(n_q, n_k, block_q, block_k, False) == grid.size // grid.shape[0] * n_q


def test_causal_halves_flash_traffic_but_not_standard():
    n, d = 4096, 64
    full = traffic.fa2_forward(n, n, d, block_q=64, block_k=64)
    half = traffic.fa2_forward(n, n, d, block_q=64, block_k=64, causal=True)
    assert 0.5 < half.elements / full.elements < 0.55
    q = np.zeros((64, d), np.float32)
    assert counted(naive_attention, q, q, q, causal=True).traffic() == traffic.standard_forward(64, 64, d)


def test_kernel_model_without_extras_is_algorithms_0_and_3():
    n_q, n_k, d, d_v = 70, 50, 16, 8
    fwd = traffic.standard_kernels(n_q, n_k, d, d_v, extra=())
    both = traffic.standard_kernels(n_q, n_k, d, d_v, extra=(), backward=True)
    assert traffic.total(fwd) == traffic.standard_forward(n_q, n_k, d, d_v)
    algorithms_0_3 = traffic.standard_forward(n_q, n_k, d, d_v) + traffic.standard_backward(n_q, n_k, d, d_v)
    assert traffic.total(both) == algorithms_0_3
    every = traffic.total(traffic.standard_kernels(n_q, n_k, d, d_v, backward=True))
    extra_passes = (every.elements - algorithms_0_3.elements) / (n_q * n_k)
    # scale and mask: 2 passes forward + 2 backward each; dropout: 3 forward (P in, P_drop and Z out),
    # 3 backward (dP, Z in, dP out); its P_drop replaces P in the two matmuls (no change).
    assert extra_passes == 2 * 4 + 6
    with pytest.raises(ValueError, match="extra"):
        traffic.standard_kernels(4, 4, 4, extra=("softmax",))


# --- SRAM ---------------------------------------------------------------------------------------
@given(st.integers(1, 150), st.integers(1, 150), st.integers(1, 40), st.integers(1, 40), blocks, blocks)
def test_sram_peak_is_the_documented_accounting(n_q, n_k, d, d_v, block_q, block_k):
    q = np.ones((n_q, d))
    k, v = np.ones((n_k, d)), np.ones((n_k, d_v))
    bound = traffic.sram_elements(block_q, block_k, d, d_v, n_q=n_q, n_k=n_k) * 8
    for loop_order in ("fa1", "fa2"):
        for causal in (False, True):
            memory = counted(
                flash_attention,
                q,
                k,
                v,
                block_q=block_q,
                block_k=block_k,
                causal=causal,
                loop_order=loop_order,
            )
            exact = not causal or n_q <= n_k
            assert memory.sram_peak_bytes == bound if exact else memory.sram_peak_bytes <= bound


@given(st.integers(1, 2**18), st.sampled_from([1, 8, 16, 64, 128]))
def test_paper_blocks_fit_exactly_as_documented(m, d):
    block_q, block_k = traffic.paper_blocks(m, d)
    assert block_k == -(-m // (4 * d)) and block_q == min(block_k, d)
    four_tiles = traffic.paper_sram_elements(block_q, block_k, d)
    assert four_tiles < m + 4 * d
    if m % (4 * d) == 0:
        assert four_tiles <= m


@pytest.mark.parametrize("m, d", [(512, 16), (1024, 16), (4096, 16), (2048, 8), (3000, 16)])
def test_paper_block_choice_never_overflows_under_the_papers_accounting(m, d):
    """Run the algorithm with the paper's blocks and read off what Q_i, K_j, V_j, O_i took at the peak."""
    rng = np.random.default_rng(m)
    q, k, v = (rng.standard_normal((200, d)) for _ in range(3))
    block_q, block_k = traffic.paper_blocks(m, d)
    for loop_order in ("fa1", "fa2"):
        memory = counted(flash_attention, q, k, v, block_q=block_q, block_k=block_k, loop_order=loop_order)
        four = sum(memory.sram_peak_tiles[name] for name in "QKVO") // q.itemsize
        assert four == traffic.paper_sram_elements(block_q, block_k, d)
        assert four <= m if m % (4 * d) == 0 else four < m + 4 * d


@given(st.integers(40, 20000), st.sampled_from([1, 8, 16, 33]), st.sampled_from([None, 5]), st.booleans())
def test_fitting_blocks_are_the_largest_that_fit(m, d, d_v, backward):
    if traffic.sram_elements(1, 1, d, d_v, backward=backward) > m:
        with pytest.raises(ValueError, match="too small"):
            traffic.fitting_blocks(m, d, d_v, backward=backward)
        return
    block_q, block_k = traffic.fitting_blocks(m, d, d_v, backward=backward)
    assert block_q == min(block_k, d)
    assert traffic.sram_elements(block_q, block_k, d, d_v, backward=backward) <= m
    assert traffic.sram_elements(min(block_k + 1, d), block_k + 1, d, d_v, backward=backward) > m


def test_fitting_blocks_run_without_overflow_and_one_more_overflows():
    d, m = 16, 3000
    q = np.random.default_rng(0).standard_normal((150, d)).astype(np.float32)
    block_q, block_k = traffic.fitting_blocks(m, d)
    memory = MemoryModel(sram_bytes=m * 4)
    flash_attention(q, q, q, block_q=block_q, block_k=block_k, memory=memory)
    assert memory.sram_peak_bytes <= m * 4
    with pytest.raises(SRAMOverflow):
        flash_attention(q, q, q, block_q=block_q, block_k=block_k + 1, memory=MemoryModel(sram_bytes=m * 4))


def test_overflow_message_names_tiles_and_suggests_blocks_that_fit():
    d = 32
    q = np.random.default_rng(1).standard_normal((2, 3, 100, d)).astype(np.float32)
    sram = 6 * 4 * 4000  # 6 (batch, head) problems side by side, 4000 float32 elements each
    with pytest.raises(SRAMOverflow) as info:
        flash_attention(q, q, q, block_q=64, block_k=64, memory=MemoryModel(sram_bytes=sram))
    message = str(info.value)
    assert f"sram_bytes={sram}" in message
    assert "Q 6x64x32 float32 49152 B" in message
    assert "M = 4000 float32 elements per (batch, head) problem" in message
    block_q, block_k = traffic.fitting_blocks(4000, d)
    assert f"block_q={block_q}, block_k={block_k}" in message
    memory = MemoryModel(sram_bytes=sram)
    flash_attention(q, q, q, block_q=block_q, block_k=block_k, memory=memory)  # the suggestion fits
    with pytest.raises(SRAMOverflow, match="too small"):
        flash_attention(q, q, q, block_q=1, block_k=1, memory=MemoryModel(sram_bytes=6 * 4 * 50))


# --- Theorem 2's trends -------------------------------------------------------------------------
def fa1_sweep(n, d, ms):
    return np.array(
        [traffic.fa1_forward(n, n, d, block_q=d, block_k=traffic.paper_blocks(m, d)[1]).elements for m in ms]
    )


def test_fa1_traffic_falls_as_one_over_m():
    """Theorem 2: Theta(N^2 d^2 / M). Large N, M from 4d to Nd/4 (closed forms, held to counts above)."""
    n, d = 2**16, 64
    ms = np.geomspace(4 * d, n * d / 4, 25).astype(int)
    slope = np.polyfit(np.log(ms), np.log(fa1_sweep(n, d, ms)), 1)[0]
    assert abs(slope + 1) < 0.1, slope


def test_standard_over_flash_ratio_grows_with_m():
    n, d = 2**14, 64
    ms = 4 * d * 2 ** np.arange(0, 10)
    ratio = traffic.standard_forward(n, n, d).elements / fa1_sweep(n, d, ms)
    assert np.all(np.diff(ratio) > 0), ratio


def test_traffic_arithmetic_and_bytes():
    a = traffic.Traffic({"Q": 3, "S": 0}, {"O": 2})
    assert a == traffic.Traffic({"Q": 3}, {"O": 2})  # zero entries do not count
    assert (a + a) == 2 * a == a * 2 == traffic.Traffic({"Q": 6}, {"O": 4})
    assert a.nbytes(2) == 10 and a.nbytes(2, {"O": 4}) == 14
    assert a.table() == [("Q", 3, 0), ("O", 0, 2)]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: traffic.forward_traffic("fa3", 8, 8, 8), ValueError, "algorithm"),
        (lambda: traffic.fa1_forward(8, 8, 8, block_q=0, block_k=4), ValueError, "block_q"),
        (lambda: traffic.fa2_forward(8, 8.5, 8, block_q=4, block_k=4), TypeError, "n_k"),
        (lambda: traffic.standard_forward(8, 8, 8, 0), ValueError, "d_v"),
        (lambda: traffic.paper_blocks(0, 8), ValueError, "SRAM size"),
        (lambda: traffic.fa1_backward(8, 8, 8, block_q=4, block_k=4, batch=-1), ValueError, "batch"),
    ],
)
def test_bad_arguments_name_themselves(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- plot helpers (flashlab.plots) --------------------------------------------------------------
def test_plots_fit_slopes_and_update_lines_in_place():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from flashlab import plots

    assert plots.loglog_slope([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    ax = Figure().subplots()
    ns = 2 ** np.arange(8, 14)
    plot = plots.traffic_vs_n(ax, ns, 64, m=32768)
    standard = plot.lines["standard"]
    assert np.array_equal(standard.get_ydata(), [traffic.standard_forward(n, n, 64).elements for n in ns])
    new = plots.sweep("n", ns, d=16, block_q=16, block_k=16)
    slopes = plots.update_traffic(plot, ns, new)
    assert plot.lines["standard"] is standard and np.array_equal(standard.get_ydata(), new["standard"])
    assert plot.slopes == slopes and "slope" in standard.get_label()
    with pytest.raises(ValueError, match="block_q and block_k, or m"):
        plots.forward_elements("fa1", 128, 64)


def test_roofline_ridge_and_missing_figures():
    from flashlab import plots

    h200 = plots.gpu_roof("H200", "bf16")
    assert h200.ridge == pytest.approx(990e12 / 4.8e12)
    assert h200.attainable(1.0) == pytest.approx(4.8e12) and h200.attainable(1e6) == pytest.approx(990e12)
    with pytest.raises(ValueError, match="no fp32_flops_per_s for A100"):
        plots.gpu_roof("A100", "fp32")
    assert plots.gpu_roof("A100", "fp32", peak_flops=1e13).ridge == pytest.approx(1e13 / 2.0e12)
    with pytest.raises(ValueError, match="precision"):
        plots.gpu_roof("H200", "fp8")
