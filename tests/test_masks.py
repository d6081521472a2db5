"""Masks as tiles: flash_attention(mask=) against torch's flex_attention and SDPA, tile classes, traffic."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlab import masks
from flashlab.flash import flash_attention
from flashlab.inputs import causal_offset
from flashlab.memory import MemoryModel
from flashlab.tiles import block_range, tile_grid, tile_needs_mask
from flashlab.tolerance import attention_bound, check_close

LOOP_ORDERS = ["fa1", "fa2"]


@st.composite
def mask_functions(draw, n_q, n_k):
    """A mask function of one of the helpers' kinds, or a random boolean matrix, for n_q x n_k."""
    kind = draw(st.sampled_from(["random", "causal", "window", "prefix", "document", "intersect"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offset = causal_offset(n_q, n_k)
    if kind == "random":
        visible = rng.random((n_q, n_k)) < draw(st.sampled_from([0.05, 0.5, 0.95]))
        return lambda q, k: visible[q, k]
    if kind == "causal":
        return masks.causal(offset)
    if kind == "window":
        return masks.sliding_window(draw(st.integers(1, n_k + 2)), offset)
    if kind == "prefix":
        return masks.prefix_lm(draw(st.integers(0, n_k)))
    n = max(n_q, n_k)
    docs = np.sort(rng.integers(0, draw(st.integers(1, 5)), n))
    if kind == "document":
        return masks.document(docs[:n_q], docs[:n_k])
    return masks.intersect(masks.document(docs[:n_q], docs[:n_k]), masks.causal(offset))


@st.composite
def masked_problems(draw, max_n=70):
    """(q, k, v, mask, block_q, block_k) with random shapes, (batch, heads), dtype and logit size."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n_q, n_k = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
    d, d_v = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    lead = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from([0.1, 1.0, 10.0]))
    q = (rng.standard_normal(lead + (n_q, d)) * spread).astype(dtype)
    k, v = (
        rng.standard_normal(lead + (n_k, d)).astype(dtype),
        rng.standard_normal(lead + (n_k, d_v)).astype(dtype),
    )
    block_q, block_k = draw(st.integers(1, n_q + 3)), draw(st.integers(1, n_k + 3))
    return q, k, v, draw(mask_functions(n_q, n_k)), block_q, block_k


def flex_reference(q, k, v, visible):
    """torch's flex_attention (CPU eager) in float64 with the dense mask as its mask_mod: (o, lse)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t = torch.from_numpy(visible)
    n_q, n_k = visible.shape
    block = create_block_mask(lambda b, h, qi, ki: t[qi, ki], None, None, n_q, n_k, device="cpu")
    q64, k64, v64 = (torch.from_numpy(np.asarray(x, np.float64)) for x in (q, k, v))
    with warnings.catch_warnings():  # eager flex_attention warns that it is not compiled
        warnings.simplefilter("ignore")
        o, lse = flex_attention(q64, k64, v64, block_mask=block, return_lse=True)
    return o.numpy(), lse.numpy()


@settings(max_examples=10, deadline=None)
@given(problem=masked_problems(), loop_order=st.sampled_from(LOOP_ORDERS))
def test_random_masks_match_flex_attention(problem, loop_order):
    q, k, v, mask, block_q, block_k = problem
    o, lse = flash_attention(
        q, k, v, mask=mask, block_q=block_q, block_k=block_k, loop_order=loop_order, return_lse=True
    )
    o_ref, lse_ref = flex_reference(q, k, v, masks.dense(mask, q.shape[-2], k.shape[-2]))
    check_close(o, o_ref, attention_bound(q, k, v), "o")
    check_close(lse, lse_ref, attention_bound(q, k, v, quantity="lse"), "lse")


@settings(max_examples=40, deadline=None)
@given(problem=masked_problems(), causal=st.booleans())
def test_random_masks_match_sdpa_with_an_explicit_mask(problem, causal):
    q, k, v, mask, block_q, block_k = problem
    n_q, n_k = q.shape[-2], k.shape[-2]
    o = flash_attention(q, k, v, mask=mask, causal=causal, block_q=block_q, block_k=block_k)
    visible = masks.dense(
        masks.intersect(mask, masks.causal(causal_offset(n_q, n_k))) if causal else mask, n_q, n_k
    )
    t = (torch.from_numpy(np.asarray(x, np.float64)) for x in (q, k, v))
    o_ref = F.scaled_dot_product_attention(*t, attn_mask=torch.from_numpy(visible)).numpy()
    seen = visible.any(axis=1)  # SDPA gives nan for a row that sees no key; flashlab gives 0
    check_close(o[..., seen, :], o_ref[..., seen, :], attention_bound(q, k, v), "o")
    assert np.all(o[..., ~seen, :] == 0)


@given(n_q=st.integers(1, 60), n_k=st.integers(1, 60), data=st.data())
def test_tile_classes_are_what_the_elements_say(n_q, n_k, data):
    mask = data.draw(mask_functions(n_q, n_k))
    block_q, block_k = data.draw(st.integers(1, n_q + 2)), data.draw(st.integers(1, n_k + 2))
    bm = masks.block_mask(mask, n_q, n_k, block_q, block_k)
    visible = masks.dense(mask, n_q, n_k)
    for i, j in np.ndindex(bm.classes.shape):
        tile = visible[slice(*block_range(i, block_q, n_q)), slice(*block_range(j, block_k, n_k))]
        expected = masks.EMPTY if not tile.any() else masks.FULL if tile.all() else masks.PARTIAL
        assert bm.classes[i, j] == expected, (i, j)
        np.testing.assert_array_equal(bm.tile(i, j), tile)
    assert sum(bm.counts().values()) == bm.classes.size


@given(n_q=st.integers(1, 90), n_k=st.integers(1, 90), block_q=st.integers(1, 40), block_k=st.integers(1, 40))
def test_the_causal_mask_gives_the_tile_schedule_of_chapter_2(n_q, n_k, block_q, block_k):
    bm = masks.block_mask(masks.causal(causal_offset(n_q, n_k)), n_q, n_k, block_q, block_k)
    np.testing.assert_array_equal(
        bm.classes != masks.EMPTY, tile_grid(n_q, n_k, block_q, block_k, causal=True)
    )
    for i, j in zip(*np.nonzero(bm.classes != masks.EMPTY), strict=True):
        assert (bm.classes[i, j] == masks.PARTIAL) == tile_needs_mask(i, j, n_q, n_k, block_q, block_k)


@settings(max_examples=40, deadline=None)
@given(problem=masked_problems(max_n=50))
def test_empty_tiles_are_never_read_or_computed(problem):
    q, k, v, mask, block_q, block_k = problem
    n_q, n_k, d, d_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    problems = q.shape[0] * q.shape[1]
    bm = masks.block_mask(mask, n_q, n_k, block_q, block_k)
    memory, trace = MemoryModel(), []
    flash_attention(q, k, v, mask=mask, block_q=block_q, block_k=block_k, memory=memory, trace=trace)
    keys = bm.keys_read()
    assert memory.read_elements["K"] == problems * keys * d
    assert memory.read_elements.get("V", 0) == problems * keys * d_v
    skipped = {(s.i, s.j) for s in trace if s.skipped}
    assert skipped == {tuple(ij) for ij in np.argwhere(bm.classes == masks.EMPTY)}
    # FA1 loads K_j, V_j once per key block that has a non-empty tile, and Q_i once per non-empty tile
    memory = MemoryModel()
    flash_attention(q, k, v, mask=mask, block_q=block_q, block_k=block_k, memory=memory, loop_order="fa1")
    widths = np.diff(np.append(np.arange(bm.classes.shape[1]) * block_k, n_k))
    heights = np.diff(np.append(np.arange(bm.classes.shape[0]) * block_q, n_q))
    used = bm.classes != masks.EMPTY
    assert memory.read_elements.get("K", 0) == problems * d * int(widths[used.any(axis=0)].sum())
    assert memory.read_elements.get("Q", 0) == problems * d * int((used * heights[:, None]).sum())


@given(
    n=st.integers(1, 200),
    extra_keys=st.integers(0, 30),
    window=st.integers(1, 80),
    block_q=st.integers(1, 40),
    block_k=st.integers(1, 40),
)
def test_sliding_window_traffic_matches_its_closed_form(n, extra_keys, window, block_q, block_k):
    n_k, d = n + extra_keys, 4
    q = np.random.default_rng(n).standard_normal((n, d))
    k = np.random.default_rng(n + 1).standard_normal((n_k, d))
    mask = masks.sliding_window(window, causal_offset(n, n_k))
    memory = MemoryModel()
    flash_attention(q, k, k, mask=mask, block_q=block_q, block_k=block_k, memory=memory)
    keys = masks.sliding_window_keys(n, n_k, window, block_q, block_k, causal_offset(n, n_k))
    assert (
        memory.read_elements["K"]
        == keys * d
        == masks.block_mask(mask, n, n_k, block_q, block_k).keys_read() * d
    )


@pytest.mark.parametrize(("n", "window", "block"), [(1024, 128, 64), (256, 64, 64), (96, 32, 16)])
def test_aligned_sliding_window_reads_window_plus_one_block_per_query_block(n, window, block):
    keys = masks.sliding_window_keys(n, n, window, block, block)
    assert keys == block * sum(min(i + 1, window // block + 1) for i in range(n // block))
    causal_keys = masks.block_mask(masks.causal(), n, n, block, block).keys_read()
    assert causal_keys == block * sum(i + 1 for i in range(n // block))


def test_prefix_document_and_intersection_helpers_say_what_they_mean():
    assert masks.dense(masks.prefix_lm(2), 4, 4).tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
    docs = masks.dense(masks.document([0, 0, 1, 1]), 4, 4)
    assert docs.tolist() == [[True, True, False, False]] * 2 + [[False, False, True, True]] * 2
    both = masks.dense(masks.intersect(masks.document([0, 0, 1, 1]), masks.causal()), 4, 4)
    np.testing.assert_array_equal(both, docs & np.tri(4, dtype=bool))
    np.testing.assert_array_equal(
        masks.dense(masks.sliding_window(2), 3, 3), np.tri(3, dtype=bool) & ~np.tri(3, k=-2, dtype=bool)
    )


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        (lambda b, h, q, k: q >= k, "two arguments"),
        (lambda q: q, "two arguments"),
        ("causal", "function"),
        (lambda q, k: q - k, "booleans"),
        (lambda q, k: np.ones((3, 3), bool), "broadcast"),
        (lambda q, k: (q >= k).ravel(), "broadcast"),
    ],
)
def test_a_bad_mask_function_is_refused_by_name(mask, words):
    q = np.ones((5, 4))
    with pytest.raises(ValueError, match=words):
        flash_attention(q, q, q, mask=mask, block_q=2, block_k=2)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: masks.sliding_window(0), "window"),
        (lambda: masks.prefix_lm(-1), "prefix"),
        (lambda: masks.document([0.5, 1.0]), "doc_ids"),
        (lambda: masks.intersect(), "at least one"),
    ],
)
def test_bad_helper_arguments_are_refused_by_name(make, words):
    with pytest.raises(ValueError, match=words):
        make()
