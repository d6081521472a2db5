"""The explorers: plain drawing functions draw what the package computes; widget callbacks redraw in place."""

from __future__ import annotations

import base64
import gc

import matplotlib.pyplot as plt
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from flashlab import widgets as W
from flashlab.attention import naive_attention
from flashlab.flash import flash_attention
from flashlab.memory import MemoryModel, SRAMOverflow
from flashlab.tiles import tile_grid, visit_order
from flashlab.traffic import fitting_blocks, forward_traffic, paper_blocks
from tests.strategies import assert_close

FEW = settings(max_examples=8)  # each example draws a figure

block_params = st.fixed_dictionaries(
    {
        "n": st.integers(1, 300),
        "d": st.integers(1, 64),
        "sram_kib": st.integers(1, 256),
        "block_q": st.integers(1, 130),
        "block_k": st.integers(1, 130),
        "loop_order": st.sampled_from(["fa1", "fa2"]),
        "causal": st.booleans(),
    }
)


def _counted(alg, n, d, block_q, block_k, causal, sram_bytes=None):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(3))
    memory = MemoryModel(sram_bytes)
    if alg == "standard":
        naive_attention(q, k, v, causal=causal, memory=memory)
    else:
        kw = dict(block_q=block_q, block_k=block_k, causal=causal, loop_order=alg)
        flash_attention(q, k, v, memory=memory, **kw)
    return memory


def _figure_count() -> int:
    gc.collect()
    return sum(isinstance(o, Figure) for o in gc.get_objects())


# --- block-size explorer: the plain drawing function ------------------------------------------
@FEW
@given(block_params)
@example(dict(n=6, d=9, sram_kib=1, block_q=6, block_k=6, loop_order="fa1", causal=False))  # does not fit
def test_block_size_view_draws_the_closed_forms_and_marks_the_counted_point(p):
    view = W.BlockSizeView()
    view.draw(**p)
    n, d, bq, bk, causal = p["n"], p["d"], p["block_q"], p["block_k"], p["causal"]
    for alg, line in view.traffic.lines.items():
        x, y = line.get_data()
        expected = [forward_traffic(alg, int(m), int(m), d, block_q=bq, block_k=bk, causal=causal) for m in x]
        assert np.array_equal(x, W.SWEEP_N)
        assert np.array_equal(y, [t.nbytes(W.DTYPE_BYTES) for t in expected])
    for alg in ("standard", p["loop_order"]):
        (mx,), (my,) = view.marks[alg].get_data()
        assert mx == n
        assert my == _counted(alg, n, d, bq, bk, causal).hbm_bytes, f"marked {alg} point != counted traffic"
    std, fa = (view.marks[alg].get_ydata()[0] for alg in ("standard", p["loop_order"]))
    if not W.sram_use(n, d, p["sram_kib"], bq, bk).fits:  # no result: the headline is at blocks that fit
        fit_q, fit_k = fitting_blocks(p["sram_kib"] * 1024 // W.DTYPE_BYTES, d)
        fa = _counted(p["loop_order"], n, d, fit_q, fit_k, causal).hbm_bytes
        assert "no result" in view.point_text.get_text()
    assert ("fewer bytes" in view.point_text.get_text()) == (fa <= std)
    other = "fa1" if p["loop_order"] == "fa2" else "fa2"
    assert len(view.marks[other].get_xdata()) == 0, "only the chosen loop order is marked"


@FEW
@given(block_params)
def test_tile_grid_image_shows_computed_and_skipped_tiles(p):
    view = W.BlockSizeView()
    view.draw(**p)
    grid = tile_grid(p["n"], p["n"], p["block_q"], p["block_k"], p["causal"])
    codes = view.grid_image.get_array()
    assert codes.shape == grid.shape  # small grids are drawn tile for tile
    assert np.array_equal(codes == 2, ~grid), "grey (2) must mark exactly the skipped tiles"
    t_r, t_c = grid.shape
    assert view.grid_image.get_extent() == [0, t_c * p["block_k"], t_r * p["block_q"], 0]
    assert view.ax_grid.get_xlim() == (0, p["n"]) and view.ax_grid.get_ylim() == (p["n"], 0)
    title = view.ax_grid.get_title()
    assert f"{t_r} x {t_c} tiles" in title
    assert f"{int(grid.sum())} computed, {int((~grid).sum())} skipped" in title


def test_large_tile_grids_are_drawn_with_a_stride_but_counted_exactly():
    view = W.BlockSizeView()
    view.draw(n=16384, d=64, sram_kib=192, block_q=8, block_k=8, causal=True)
    assert max(view.grid_image.get_array().shape) <= W.MAX_GRID_PIXELS
    assert "2048 x 2048 tiles" in view.ax_grid.get_title()
    assert f"{2048 * 2049 // 2} computed" in view.ax_grid.get_title()


# --- the SRAM indicator against the memory model --------------------------------------------
@given(block_params)
def test_sram_indicator_is_the_memory_models_peak_of_a_full_run(p):
    n, d, bq, bk = p["n"], p["d"], p["block_q"], p["block_k"]
    use = W.sram_use(n, d, p["sram_kib"], bq, bk)
    assert use.capacity_bytes == p["sram_kib"] * 1024
    assert use.fits == (use.used_bytes <= use.capacity_bytes)
    full = _counted(p["loop_order"], n, d, bq, bk, p["causal"])
    assert use.used_bytes == full.sram_peak_bytes
    # ... so a run with exactly that capacity fits, and one byte less overflows.
    _counted(p["loop_order"], n, d, bq, bk, p["causal"], sram_bytes=use.used_bytes)
    with pytest.raises(SRAMOverflow):
        _counted(p["loop_order"], n, d, bq, bk, p["causal"], sram_bytes=use.used_bytes - 1)
    assert use.tiles_bytes == 4 * (min(n, bq) + min(n, bk)) * 2 * d


@pytest.mark.parametrize(("sram_kib", "d", "fits"), [(192, 64, True), (100, 64, False), (192, 128, False)])
def test_indicator_text_says_whether_the_paper_blocks_fit(sram_kib, d, fits):
    params = W.block_size_defaults(sram_kib, d)
    view = W.BlockSizeView()
    view.draw(**params)
    use = W.sram_use(params["n"], d, sram_kib, params["block_q"], params["block_k"])
    assert use.fits is fits
    text = view.sram_text.get_text()
    assert text.startswith("fits in SRAM" if fits else "does NOT fit in SRAM")
    assert f"{use.used_bytes:,} B on chip of {sram_kib * 1024:,} B" in text
    if not fits:  # ... and suggests blocks that do fit
        fit_q, fit_k = fitting_blocks(sram_kib * 1024 // 4, d)
        assert f"that fit: B_r = {fit_q}, B_c = {fit_k}" in text
        assert W.sram_use(params["n"], d, sram_kib, fit_q, fit_k).fits


def test_defaults_follow_the_papers_block_rule():
    for sram_kib, d in [(192, 64), (100, 32), (228, 128), (64, 256)]:
        p = W.block_size_defaults(sram_kib, d)
        assert (p["block_q"], p["block_k"]) == paper_blocks(sram_kib * 1024 // 4, d)


# --- block-size explorer: widget callbacks -----------------------------------------------------
def test_slider_changes_redraw_the_same_figure_in_place():
    before_pyplot, before_all = plt.get_fignums(), _figure_count()
    ex = W.block_size_explorer()
    fig, lines, image = ex.view.fig, dict(ex.view.traffic.lines), ex.image.value
    for n in (256, 1024, 16384, 128, 4096):
        ex.controls["n"].value = n
        assert ex.view.marks["standard"].get_xdata()[0] == n
        assert ex.status.value.startswith("fits in SRAM") and f"N = {n}," in ex.status.value
        assert ex.image.value != image, "the image must change with N"
        image = ex.image.value
    ex.controls["causal"].value = True
    assert "causal" in ex.view.title.get_text()
    assert len(ex.view.marks["fa1"].get_xdata()) == 1 and len(ex.view.marks["fa2"].get_xdata()) == 0
    ex.controls["loop_order"].value = "fa2"
    assert len(ex.view.marks["fa2"].get_xdata()) == 1 and len(ex.view.marks["fa1"].get_xdata()) == 0
    assert ex.view.fig is fig and ex.view.traffic.lines == lines
    assert len(ex.view.ax.lines) == 6 and len(ex.view.ax_grid.images) == 1
    del ex
    assert plt.get_fignums() == before_pyplot, "explorers must not open pyplot figures"
    assert _figure_count() <= before_all + 1, "redraws must reuse the figure"


def test_changing_m_or_d_resets_the_blocks_to_the_papers_rule_with_one_redraw():
    ex = W.block_size_explorer()
    draws = []
    original = ex.view.draw
    ex.view.draw = lambda **p: (draws.append(p), original(**p))
    ex.controls["block_k"].value = 40
    assert draws[-1]["block_k"] == 40
    ex.controls["sram_kib"].value = 100
    assert len(draws) == 2, "one redraw per change, with the new blocks already set"
    assert (draws[-1]["block_q"], draws[-1]["block_k"]) == paper_blocks(100 * 1024 // 4, 64)
    ex.controls["d"].value = 128
    assert (ex.controls["block_q"].value, ex.controls["block_k"].value) == paper_blocks(100 * 1024 // 4, 128)
    ex.controls["n"].value = 1024
    assert (ex.controls["block_q"].value, ex.controls["block_k"].value) == paper_blocks(100 * 1024 // 4, 128)


def test_explorer_output_carries_the_widget_and_a_static_png():
    ex = W.block_size_explorer(n=1024, causal=True)
    bundle = ex._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == ex.widget.model_id
    png = base64.b64decode(bundle["image/png"])
    assert png.startswith(b"\x89PNG") and png == ex.image.value
    assert "static figure" in bundle["text/plain"]
    assert "flashlab-block-size" in ex.widget._dom_classes


def test_bad_parameters_are_rejected_with_their_name():
    with pytest.raises(ValueError, match="loop_order"):
        W.block_size_figure(loop_order="fa3")
    with pytest.raises(ValueError, match="block_q"):
        W.block_size_figure(block_q=0)
    with pytest.raises(TypeError, match="unknown block-size parameters"):
        W.block_size_figure(blocks=64)
    with pytest.raises(ValueError, match="visit"):
        W.step_figure(visit=0)
    with pytest.raises(ValueError, match="visit"):
        W.step_figure(visit=10**6)


# --- step-through -------------------------------------------------------------------------------
examples = st.builds(
    W.example,
    n_q=st.integers(1, 20),
    n_k=st.integers(1, 20),
    d=st.integers(1, 6),
    block_q=st.integers(1, 7),
    block_k=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)


@given(examples, st.sampled_from(["fa1", "fa2"]), st.booleans())
def test_steps_follow_the_schedule_and_end_exact(ex, loop_order, causal):
    run = W.run_steps(ex, loop_order, causal)
    n_q, n_k = len(ex.q), len(ex.k)
    schedule = visit_order(n_q, n_k, ex.block_q, ex.block_k, causal, loop_order)
    assert [(s.i, s.j) for s in run.trace] == schedule
    exact = W.exact_rows(ex, causal)
    seen = np.isfinite(exact.m)  # rows with no visible key (causal, N_q > N_k) keep no state
    assert_close(run.o[-1][seen], exact.o[seen], ex.q, ex.k, ex.v, what="final partial O")
    # m is a logit (the lse bound covers a logit's error); l a sum of weights, bounded like o with v = l
    assert_close(run.m[-1][seen], exact.m[seen], ex.q, ex.k, ex.v, quantity="lse", what="final running max")
    ones = np.full_like(ex.v[:, :1], np.max(exact.l[seen], initial=1.0))
    assert_close(run.l[-1][seen], exact.l[seen], ex.q, ex.k, ones, what="final running sum")
    assert run.finished[-1][seen].all()
    for s in range(len(run.trace)):
        done = run.finished[s] & seen
        assert_close(run.o[s][done], exact.o[done], ex.q, ex.k, ex.v, what=f"finished rows at step {s}")
    # Rescaling keeps l relative to the running max; l * exp(m), the sum of exp(S) over the keys seen
    # so far, only grows.
    with np.errstate(invalid="ignore"):
        partial = run.l * np.exp(run.m)
    grown = np.diff(np.nan_to_num(partial, nan=0.0), axis=0)
    assert np.all(grown >= -1e-9 * np.nanmax(np.abs(partial), initial=1.0))


def test_rows_not_reached_yet_are_not_drawn():
    view = W.StepView()
    view.draw(visit=1, loop_order="fa2")
    first = view.steps("fa2", False).trace[0]
    y = view.part_m.get_ydata()
    assert np.isfinite(y[slice(*first.rows)]).all() and np.isnan(np.delete(y, np.arange(*first.rows))).all()


@pytest.mark.parametrize("loop_order", ["fa1", "fa2"])
def test_step_view_shows_the_tile_on_chip_and_the_rows_state(loop_order):
    view = W.StepView()
    run = view.steps(loop_order, True)
    for number in (1, 5, view.n_steps):
        view.draw(visit=number, loop_order=loop_order, causal=True)
        step = number - 1
        visit = run.trace[step]
        (r0, r1), (c0, c1) = visit.rows, visit.cols
        assert view.current.get_bbox().bounds == (c0 - 0.5, r0 - 0.5, c1 - c0, r1 - r0)
        codes = view.tile_image.get_array()
        if not visit.skipped:
            assert (codes[r0:r1, c0:c1] == W.CURRENT).any()
        np.testing.assert_array_equal(view.part_o.get_ydata(), run.o[step][:, 0])
        np.testing.assert_array_equal(view.part_l.get_ydata(), run.l[step])
        assert f"{loop_order}, tile visit {number} of {view.n_steps}" in view.title.get_text()
        assert ("skipped" in view.title.get_text()) == visit.skipped


def test_step_slider_play_and_toggles_redraw_in_place():
    before_pyplot = plt.get_fignums()
    ex = W.step_through()
    fig, image = ex.view.fig, ex.image.value
    visit = ex.controls["visit"]
    assert (visit.min, visit.max) == (1, ex.view.n_steps) and ex.view.n_steps == len(
        ex.view.steps("fa2", False).trace
    )
    play = ex.widget.children[0].children[0]
    assert (play.min, play.max) == (visit.min, visit.max)
    visit.value = 6
    assert ex.image.value != image
    assert ex.status.value.startswith(f"fa2, tile visit 6 of {ex.view.n_steps}: tile (i=")
    np.testing.assert_array_equal(ex.view.part_m.get_ydata(), ex.view.steps("fa2", False).m[5])
    ex.controls["loop_order"].value = "fa1"
    np.testing.assert_array_equal(ex.view.part_m.get_ydata(), ex.view.steps("fa1", False).m[5])
    ex.controls["causal"].value = True
    np.testing.assert_array_equal(ex.view.part_m.get_ydata(), ex.view.steps("fa1", True).m[5])
    assert ex.view.fig is fig and plt.get_fignums() == before_pyplot
    assert "flashlab-step-through" in ex.widget._dom_classes
    assert base64.b64decode(ex._repr_mimebundle_()["image/png"]).startswith(b"\x89PNG")


def test_static_figures_are_figures_outside_pyplot():
    before = plt.get_fignums()
    assert isinstance(W.block_size_figure(n=512), Figure)
    assert isinstance(W.step_figure(visit=3, loop_order="fa1"), Figure)
    assert plt.get_fignums() == before


def test_blocks_that_do_not_fit_are_greyed_and_never_headlined():
    view = W.BlockSizeView()
    view.draw(n=4096, d=64, sram_kib=164, block_q=256, block_k=1024, loop_order="fa1")
    text = view.point_text.get_text()
    fit = fitting_blocks(164 * 1024 // W.DTYPE_BYTES, 64)
    assert "do not fit" in text and "no result" in text and f"({fit[0]}, {fit[1]})" in text
    assert view.traffic.lines["fa1"].get_color() == "grey" and view.marks["fa1"].get_color() == "grey"
    view.draw(n=4096, d=64, sram_kib=164, block_q=64, block_k=128, loop_order="fa1")  # fits again
    assert "fewer bytes" in view.point_text.get_text() and "no result" not in view.point_text.get_text()
    assert view.traffic.lines["fa1"].get_color() != "grey"


def test_default_sram_is_the_a100_shared_memory_from_hardware_json():
    from flashlab import hardware

    assert W.block_size_defaults()["sram_kib"] * 1024 == hardware.shared_memory_bytes("A100")
