"""What attention heads look like: logit sizes, sinks, locality, and how often the online max moves.

Every function takes one or more heads ``q (..., N, d)``, ``k (..., N, d)`` (K/V heads already matched
to the query heads, e.g. by :func:`expand_kv`) with the causal mask of a decoder, scale ``1/sqrt(d)``
unless given, and computes in float64: these are measurements, not an implementation under test.
"""

from __future__ import annotations

import numpy as np

from flashlab.flash import flash_attention
from flashlab.inputs import causal_mask


def expand_kv(x: np.ndarray, h_q: int) -> np.ndarray:
    """K or V heads ``(..., h_kv, N, d)`` repeated so that query head ``h`` meets K/V head
    ``h // (h_q / h_kv)`` (grouped-query attention, as :func:`flashlab.flash.flash_attention`)."""
    return np.repeat(x, h_q // x.shape[-3], axis=-3)


def logits(q, k, scale=None) -> np.ndarray:
    """Scaled, causally masked scores ``(..., N, N)`` in float64 (``-inf`` above the diagonal)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ np.swapaxes(k, -1, -2)
    return np.where(causal_mask(q.shape[-2], k.shape[-2]), s, -np.inf)


def probabilities(q, k, scale=None) -> np.ndarray:
    """The attention weights ``softmax(logits)`` ``(..., N, N)``, each row summing to 1."""
    s = logits(q, k, scale)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def row_max_logits(q, k, scale=None) -> np.ndarray:
    """``(..., N)``: each query's largest logit, the ``m`` the online softmax ends with."""
    return logits(q, k, scale).max(axis=-1)


def sink_mass(q, k, first: int = 1, scale=None) -> np.ndarray:
    """``(..., N)``: the attention mass each query puts on the first ``first`` tokens (an attention sink
    is a key that takes much of every row's mass whatever the query)."""
    return probabilities(q, k, scale)[..., :first].sum(axis=-1)


def local_mass(q, k, window: int, scale=None) -> np.ndarray:
    """``(..., N)``: the mass each query puts on its last ``window`` keys (itself included): what a
    sliding window of that size would keep."""
    p = probabilities(q, k, scale)
    n = p.shape[-1]
    near = np.arange(n)[None, :] > np.arange(n)[:, None] - window
    return np.where(near, p, 0.0).sum(axis=-1)


def max_changes(q, k, v, block_q: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
    """How often the running max ``m`` of the online softmax grows, tile by tile (causal FA2).

    Runs :func:`flashlab.flash.flash_attention` with a ``trace`` and counts, for every query row, the
    computed tiles after its first at which ``m`` increased (each such step rescales ``l`` and the
    accumulator by ``e^(m_old - m_new) < 1``). Returns ``(changes, chances)`` of shape ``(..., N)``:
    the increases and the number of tiles after the first (``changes / chances`` is the rate).
    """
    trace = []
    flash_attention(q, k, v, causal=True, block_q=block_q, block_k=block_k, trace=trace)
    n = q.shape[-2]
    changes = np.zeros(q.shape[:-2] + (n,), int)
    chances = np.zeros(n, int)
    last: dict[int, np.ndarray] = {}  # query block -> its m after the previous computed tile
    for step in trace:
        if step.skipped:
            continue
        r0, r1 = step.rows
        before = last.get(step.i)
        if before is not None:
            seen = np.isfinite(before)  # a row that saw a key in an earlier tile
            changes[..., r0:r1] += seen & (step.m > before)
            chances[r0:r1] += 1
        last[step.i] = step.m
    return changes, np.broadcast_to(chances, changes.shape)


def gaussian_like(q, k, v, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard normal ``q, k, v`` of the same shapes, scaled to the same root-mean-square entry as the
    real ones: the inputs of every earlier chapter, at the real heads' size."""
    rng = np.random.default_rng(seed)
    return tuple(
        rng.standard_normal(x.shape) * np.sqrt(np.mean(np.square(x, dtype=np.float64))) for x in (q, k, v)
    )
