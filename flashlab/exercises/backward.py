"""Chapter 5 exercise: the softmax backward for one tile, ``dS = P * (dP - D)``.

The learner writes ``softmax_backward(p, dp, do, o) -> ds`` for one ``B_r x B_c`` tile of
FlashAttention's backward (Algorithm 4, lines 19-20): ``p`` and ``dp`` are the tile's
probabilities and their gradients, ``do`` and ``o`` the ``B_r x d_v`` rows of the output's gradient
and of the output. The tiles come from real attention problems and hold only some of each row's
keys, so ``rowsum(P * dP)`` over the tile is *not* ``D``: only ``D = rowsum(dO * O)`` is. The
checker names the usual mistakes (``D`` forgotten, taken from the tile, taken as ``rowsum(dP)``,
subtracted along the wrong axis, one number for the whole block, the sign flipped, ``P`` missing).
The solution uses the course's own :func:`flashlab.backward.row_dot` for ``D``.
"""

from __future__ import annotations

import numpy as np

from flashlab.attention import naive_attention
from flashlab.backward import row_dot
from flashlab.check import Mistake, exercise, expect
from flashlab.inputs import causal_mask


def softmax_backward_tile(p, dp, do, o):
    """``dS = P * (dP - D)`` for one tile (Algorithm 4, line 20).

    ``p``, ``dp`` ``(B_r, B_c)``: the tile of ``P`` and of ``dP = dO V^T``; ``do``, ``o``
    ``(B_r, d_v)``: the tile's rows of ``dO`` and ``O``. ``D_i = rowsum(dO_i * O_i)`` (line 19)
    is one number per query row, so it broadcasts across the tile's columns.
    """
    d = row_dot(do, o)  # D = rowsum(dO * O): the whole row's sum_k P_k dP_k, shape (B_r,)
    return p * (dp - d[:, None])


def softmax_problem(n_q, n_k, d_v, *, causal=False, seed=0):
    """``(P, dP, dO, O)`` in float64 for a random attention problem with ``d = 4`` (bottom-right
    ``causal``): ``P (n_q, n_k)``, ``dP = dO V^T (n_q, n_k)``, ``dO``, ``O (n_q, d_v)``."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((n_q, 4)), rng.standard_normal((n_k, 4)) * 2
    v, do = rng.standard_normal((n_k, d_v)), rng.standard_normal((n_q, d_v))
    o, lse = naive_attention(q, k, v, causal=causal, return_lse=True)
    s = (q @ k.T) / 2.0  # the default scale 1 / sqrt(d)
    if causal:
        s = np.where(causal_mask(n_q, n_k), s, -np.inf)
    p = np.exp(s - np.where(np.isfinite(lse), lse, 0.0)[:, None])  # a row that sees no key: P = 0
    return p, do @ v.T, do, o


CASES = [  # (what, (n_q, n_k, d_v), rows, cols, causal, dtype)
    ("a 4 x 4 tile: keys 4..7 of 10", (6, 10, 3), (0, 4), (4, 8), False, np.float64),
    ("a ragged 3 x 5 float32 tile", (7, 9, 2), (4, 7), (0, 5), False, np.float32),
    ("a tile holding whole rows", (5, 6, 3), (1, 4), (0, 6), False, np.float64),
    ("causal, N_q = 5 > N_k = 3: rows 0, 1 see no key", (5, 3, 2), (0, 5), (0, 3), True, np.float64),
]


def _diagnose(ds, want, p, dp, do, o) -> str:
    """Words for the usual wrong answers (float64 inputs), a plain comparison otherwise."""
    d = np.sum(do * o, axis=1)
    wrong = {
        "forgot to subtract D: dS = P * (dP - D), where D_i = rowsum(dO_i * O_i) is one number per query row "
        "(the -p p^T part of the softmax's Jacobian diag(p) - p p^T)": p * dp,
        "D was taken from this tile's P and dP: rowsum(P_ij * dP_ij) adds only the tile's B_c keys, but D "
        "sums over the whole row. Use D = rowsum(dO * O): O has already summed P over every key": p
        * (dp - np.sum(p * dp, axis=1, keepdims=True)),
        "D = rowsum(dP) leaves out the weights: D = sum_k P_k dP_k, which equals rowsum(dO * O)": p
        * (dp - dp.sum(axis=1, keepdims=True)),
        "D was subtracted along the wrong axis: D has one number per query row (shape (B_r,)); subtract "
        "D[:, None] so that it broadcasts across the tile's columns": p * (dp - d[None, :])
        if p.shape[0] == p.shape[1]
        else None,
        "D was summed over the whole block into one number: D is per row, rowsum(dO * O) along the last "
        "axis": p * (dp - np.sum(do * o)),
        "the sign is flipped: dS = P * (dP - D), not P * (D - dP)": p * (d[:, None] - dp),
        "the factor P is missing: dS = P * (dP - D), elementwise": dp - d[:, None],
    }
    for words, value in wrong.items():
        if value is not None and np.allclose(ds, value, rtol=1e-4, atol=1e-6):
            return words
    factor = float(np.sum(ds * want) / np.sum(want * want))
    if np.allclose(ds, factor * want, rtol=1e-4, atol=1e-6):
        return (
            f"dS is {factor:.4g} times P * (dP - D): the softmax backward has no scale factor; the scale tau "
            "enters later, in dQ = tau dS K and dK = tau dS^T Q"
        )
    return f"dS = {np.round(ds, 6).tolist()}, expected P * (dP - D) = {np.round(want, 6).tolist()}"


@exercise(
    "softmax_backward",
    chapter=5,
    title="the softmax backward for a tile, softmax_backward(P, dP, dO, O) -> dS",
    solution=softmax_backward_tile,
)
def check_softmax_backward(softmax_backward) -> None:
    """Tiles of real problems, each holding part of its rows' keys; the first wrong tile is explained."""
    for what, sizes, (r0, r1), (c0, c1), causal, dtype in CASES:
        p, dp, do, o = softmax_problem(*sizes, causal=causal)
        tile = [x.astype(dtype) for x in (p[r0:r1, c0:c1], dp[r0:r1, c0:c1], do[r0:r1], o[r0:r1])]
        shape = tile[0].shape
        try:
            ds = softmax_backward(*(x.copy() for x in tile))
        except ValueError as e:
            if "broadcast" not in str(e):
                raise
            raise Mistake(
                f"{what}: shapes did not broadcast ({e}). P and dP are B_r x B_c = {shape}, D has one "
                "number per query row: subtract D[:, None] (shape (B_r, 1)) from dP"
            ) from None
        ds = np.asarray(ds, dtype=np.float64)
        expect(ds.shape == shape, f"{what}: dS must have the tile's shape {shape}, got {ds.shape}")
        wide = [x.astype(np.float64) for x in tile]
        want = softmax_backward_tile(*wide)
        rtol = 1e-5 if dtype == np.float32 else 1e-12
        if not np.allclose(ds, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max()))):
            raise Mistake(f"{what}: " + _diagnose(ds, want, *wide))
