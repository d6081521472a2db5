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


# --- the whole step: one (query block, key block) pair ---------------------------------------------


def block_pair_backward(q, k, v, do, lse, delta, scale, mask):
    """One (query block i, key block j) pair of Algorithm 4 (lines 11-22): the pair's contributions
    ``(dq_i, dk_j, dv_j)``, to be summed over the other blocks.

    ``q, do (B_r, d)``, ``k, v (B_c, d)``, ``lse, delta (B_r,)``: the block's rows of the forward's
    log-sum-exp and of ``D = rowsum(dO * O)``; ``mask (B_r, B_c)`` bool, True where a query sees a key.
    """
    s = np.where(mask, scale * (q @ k.T), -np.inf)  # lines 11-12
    p = np.exp(s - np.where(np.isfinite(lse), lse, 0.0)[:, None])  # line 13: P from lse, not a softmax
    dv = p.T @ do  # line 16
    dp = do @ v.T  # line 17
    ds = p * (dp - delta[:, None])  # line 20
    return scale * ds @ k, scale * ds.T @ q, dv  # lines 21, 22, 16


BLOCK_CASES = [  # (what, n_q, n_k, block_q, block_k, causal)
    ("3 x 2 blocks of 4 x 3, no mask", 12, 6, 4, 3, False),
    ("ragged blocks, N_q = 7, N_k = 10, causal", 7, 10, 3, 4, True),
    ("causal with N_q = 9 > N_k = 5 (rows that see no key)", 9, 5, 3, 2, True),
]


def _blocked_gradients(fn, q, k, v, do, lse, delta, scale, causal, block_q, block_k):
    """Sum ``fn``'s contributions over every (query block, key block) pair."""
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    visible = causal_mask(len(q), len(k)) if causal else np.ones((len(q), len(k)), bool)
    for i0 in range(0, len(q), block_q):
        for j0 in range(0, len(k), block_k):
            rows, cols = slice(i0, i0 + block_q), slice(j0, j0 + block_k)
            args = (q[rows], k[cols], v[cols], do[rows], lse[rows], delta[rows], scale, visible[rows, cols])
            got = fn(*(np.array(x, copy=True) if isinstance(x, np.ndarray) else x for x in args))
            for name, g, x in zip(("dq_i", "dk_j", "dv_j"), got, (q[rows], k[cols], v[cols]), strict=True):
                expect(
                    np.shape(g) == x.shape,
                    f"{name} must have shape {x.shape} (this pair: {len(q[rows])} query rows, "
                    f"{len(k[cols])} keys), got {np.shape(g)}: check which side of P or dS is transposed",
                )
            dq[rows] += got[0]
            dk[cols] += got[1]
            dv[cols] += got[2]
    return dq, dk, dv


def _tile_softmax(q, k, v, do, lse, delta, scale, mask):
    s = np.where(mask, scale * (q @ k.T), -np.inf)
    m = np.max(s, axis=1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    p = e / np.maximum(e.sum(axis=1, keepdims=True), np.finfo(float).tiny)
    ds = p * (do @ v.T - delta[:, None])
    return scale * ds @ k, scale * ds.T @ q, p.T @ do


def _no_scale(*args):
    dq, dk, dv = block_pair_backward(*args)
    return dq / args[6], dk / args[6], dv


def _no_mask(q, k, v, do, lse, delta, scale, mask):
    return block_pair_backward(q, k, v, do, lse, delta, scale, np.ones_like(mask))


def _no_delta(q, k, v, do, lse, delta, scale, mask):
    return block_pair_backward(q, k, v, do, lse, np.zeros_like(delta), scale, mask)


BLOCK_MISTAKES = {  # a likely wrong step -> what to say when the learner's sums match it
    _tile_softmax: "P was a softmax over this tile's keys: in the backward P = exp(S - lse) with the "
    "forward's lse, the whole row's log-sum-exp (a tile holds only some of the row's keys)",
    _no_scale: "dQ_i and dK_j are missing the factor scale: dQ_i = scale dS K_j, dK_j = scale dS^T Q_i "
    "(S = scale Q K^T, so each gradient through S carries it)",
    _no_mask: "the causal mask was not applied: where mask is False, S = -inf, so P = 0 there",
    _no_delta: "D was left out: dS = P * (dP - D) with D the given delta, one number per query row",
}


@exercise(
    "backward_block_pair",
    chapter=5,
    title="one (query block, key block) pair of the backward: dq_i, dk_j, dv_j contributions",
    solution=block_pair_backward,
)
def check_block_pair(fn) -> None:
    """Sums the learner's contributions over all block pairs and compares with the float64 gradients."""
    from flashlab.backward import naive_attention_backward
    from flashlab.tolerance import gamma, unit_roundoff

    rng = np.random.default_rng(11)
    for what, n_q, n_k, block_q, block_k, causal in BLOCK_CASES:
        q, do = rng.standard_normal((n_q, 4)), rng.standard_normal((n_q, 4))
        k, v = rng.standard_normal((n_k, 4)) * 2, rng.standard_normal((n_k, 4))
        scale = 0.6
        o, lse = naive_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
        delta = row_dot(do, o)
        with np.errstate(all="ignore"):
            got = _blocked_gradients(fn, q, k, v, do, lse, delta, scale, causal, block_q, block_k)
        want = naive_attention_backward(q, k, v, do, causal=causal, scale=scale)
        tol = 8 * gamma(n_q + n_k, unit_roundoff(np.float64))  # float64 sums of a few terms, any order
        if all(np.allclose(g, w, rtol=tol, atol=tol) for g, w in zip(got, want, strict=True)):
            continue
        expect(
            all(np.all(np.isfinite(g)) for g in got), f"{what}: not finite: a row that sees no key has P = 0"
        )
        for mistake, words in BLOCK_MISTAKES.items():
            wrong = _blocked_gradients(mistake, q, k, v, do, lse, delta, scale, causal, block_q, block_k)
            if all(np.allclose(g, x, rtol=tol, atol=tol) for g, x in zip(got, wrong, strict=True)):
                raise Mistake(f"{what}: {words}")
        name = next(
            n
            for n, g, w in zip(("dq", "dk", "dv"), got, want, strict=True)
            if not np.allclose(g, w, rtol=tol, atol=tol)
        )
        raise Mistake(f"{what}: {name} is wrong. " + _block_hint(name, causal))


def _block_hint(name: str, causal: bool) -> str:
    hints = {
        "dv": "dV_j = P^T dO_i with P = exp(S - lse), the probabilities of the WHOLE row: a softmax over "
        "this tile alone normalises by the tile's keys only",
        "dq": "dQ_i = scale dS K_j with dS = P * (dP - D), dP = dO_i V_j^T; D is the given delta",
        "dk": "dK_j = scale dS^T Q_i: the same dS as dQ, transposed",
    }
    return hints[name] + (" (causal: masked entries of S are -inf, so their P is 0)" if causal else "")
