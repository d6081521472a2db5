"""Statistics of real heads and the mask explorer over the committed capture."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from flashlab import capture, heads, mask_explorer, masks
from flashlab.tolerance import Bound, check_close, gamma, unit_roundoff


@given(n=st.integers(2, 40), block=st.integers(1, 12), seed=st.integers(0, 1000))
def test_max_changes_count_the_tiles_where_the_row_max_grew(n, block, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((n, 4)) * 3 for _ in range(3))
    changes, chances = heads.max_changes(q, k, v, block, block)
    s = heads.logits(q, k)
    for r in range(n):  # the running max after each key block, from the scores themselves
        maxima = [s[r, j : j + block].max() for j in range(0, r + 1, block)]
        assert chances[r] == len(maxima) - 1
        assert changes[r] == sum(
            b > a for a, b in zip(np.maximum.accumulate(maxima), maxima[1:], strict=False)
        )


def test_masses_are_fractions_and_a_window_of_everything_keeps_all():
    c = capture.load()
    q, k = c.q[0][0].astype(np.float64), heads.expand_kv(c.k[0][0].astype(np.float64), c.q[0].shape[1])
    n = q.shape[-2]
    assert np.all((heads.sink_mass(q, k) >= 0) & (heads.sink_mass(q, k) <= 1 + 1e-12))
    sums = Bound(2 * gamma(n, unit_roundoff(np.float64)), f"a normalised sum of {n} float64 terms")
    check_close(heads.local_mass(q, k, n), np.ones(q.shape[:-1]), sums, "mass of every key")
    np.testing.assert_array_equal(heads.sink_mass(q, k, first=n), heads.local_mass(q, k, n))


def test_the_explorer_counts_what_the_block_mask_says():
    view = mask_explorer.MaskView()
    for kind in mask_explorer.MASKS:
        view.draw(mask=kind, block_q=8, block_k=16)
        fn = mask_explorer.mask_for(kind, view.data.tokens[0], 16, 16)
        n = view.data.q[0].shape[-2]
        bm = masks.block_mask(fn, n, n, 8, 16)
        assert f"{bm.counts()['empty']} of {bm.classes.size} tiles empty" in view.caption
        assert f"{kind} {2 * 64 * bm.keys_read()}" in view.caption  # K and V, d = 64


def test_sentence_ids_start_a_document_after_each_sentence():
    assert mask_explorer.sentence_ids(["A", "b", ".", "C", "?", "d"]).tolist() == [0, 0, 0, 1, 1, 2]
