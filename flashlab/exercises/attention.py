"""Chapter 0 warm-up: standard attention (Algorithm 0) for one head, in NumPy.

The learner writes ``attention(q, k, v) -> o`` for ``q (N_q, d)``, ``k (N_k, d)``, ``v (N_k, d_v)``:
``S = Q K^T / sqrt(d)``, ``P = softmax(S)`` row by row (with the row max subtracted), ``O = P V``.
The checker compares with float64 :func:`flashlab.naive_attention` within the derived bound of
:mod:`flashlab.tolerance` and names the usual slips: the softmax over the wrong axis, no scale,
no max subtraction (large logits overflow), no normalisation, ``K`` not transposed.
"""

from __future__ import annotations

import numpy as np

from flashlab.attention import naive_attention
from flashlab.check import exercise, expect
from flashlab.tolerance import attention_bound


def attention(q, k, v):
    """Standard attention for one head: ``softmax(Q K^T / sqrt(d)) V`` with the row max subtracted."""
    s = q @ k.T / np.sqrt(q.shape[1])
    p = np.exp(s - s.max(axis=1, keepdims=True))  # every exponent <= 0: no overflow
    return (p / p.sum(axis=1, keepdims=True)) @ v


def _cases():
    """``[(what, q, k, v), ...]``: non-square shapes (so a wrong axis shows), then large logits."""
    rng = np.random.default_rng(3)
    return [
        (
            "N_q = 5 queries, N_k = 7 keys, d = 4, d_v = 3",
            *(rng.standard_normal(s) for s in ((5, 4), (7, 4), (7, 3))),
        ),
        (
            "logits near 1000 (exp overflows without the max)",
            rng.standard_normal((4, 8)) * 40,
            rng.standard_normal((6, 8)) * 40,
            rng.standard_normal((6, 2)),
        ),
    ]


def _variants(q, k, v) -> dict[str, np.ndarray]:
    """What the usual slips compute, by message."""
    d = q.shape[1]
    s = q @ k.T / np.sqrt(d)
    with np.errstate(all="ignore"):
        p0 = np.exp(s - s.max(axis=0, keepdims=True))
        p = np.exp(s - s.max(axis=1, keepdims=True))
        s1 = q @ k.T
        p1 = np.exp(s1 - s1.max(axis=1, keepdims=True))
        return {
            "the softmax ran down the columns (axis=0): each row of P, one query's weights over the keys, "
            "must sum to 1, so take max and sum along axis=1": (p0 / p0.sum(axis=0, keepdims=True)) @ v,
            "the scores were not scaled: S = Q K^T / sqrt(d)": (p1 / p1.sum(axis=1, keepdims=True)) @ v,
            "P was not normalised: divide each row of exp(S - m) by its sum before multiplying by V": p @ v,
        }


@exercise("attention", chapter=0, title="standard attention attention(q, k, v) -> o", solution=attention)
def check_attention(fn) -> None:
    """Each case against float64 attention; the first wrong one is explained."""
    for what, q, k, v in _cases():
        try:
            with np.errstate(all="ignore"):
                got = np.asarray(fn(q.copy(), k.copy(), v.copy()), np.float64)
        except ValueError as e:
            expect(False, f"{what}: {e}. Shapes: S = Q K^T is N_q x N_k, so transpose K (k.T), then O = P V")
        want, bound = naive_attention(q, k, v), attention_bound(q, k, v)
        expect(
            got.shape == want.shape, f"{what}: o must have shape (N_q, d_v) = {want.shape}, got {got.shape}"
        )
        if not np.all(np.isfinite(got)):
            expect(
                False,
                f"{what}: inf or nan from finite input: exp(S) overflowed. Subtract each row's max "
                "first, p = exp(S - S.max(axis=1, keepdims=True)): the softmax is unchanged and exp <= 1",
            )
        if np.max(np.abs(got - want)) <= bound.atol:
            continue
        words = next(
            (w for w, x in _variants(q, k, v).items() if np.max(np.abs(got - x)) <= bound.atol), None
        )
        expect(
            False, f"{what}: {words or f'o differs from attention by up to {np.max(np.abs(got - want)):.3g}'}"
        )
