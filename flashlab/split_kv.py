"""Split-KV attention (flash-decoding): one partial state per chunk of keys, then chapter 1's merge.

With one query row per sequence (decoding), FlashAttention-2's grid has one thread block per
(batch, head): too few to fill a GPU. Split-KV cuts the keys into ``splits`` chunks, computes the
:class:`flashlab.online_softmax.State` of every chunk independently (on a GPU: in parallel, one
block per chunk) and combines them with :func:`flashlab.online_softmax.merge` (Dao et al., 2023,
"Flash-Decoding for long-context inference"). The result is exact attention: merge is associative
and commutative, and an empty chunk's state is its identity.

Chunks are ``ceil(N_k / splits)`` keys long (the last one shorter, trailing ones possibly empty),
the same cut the numba.cuda kernel in :mod:`flashlab.cuda.decode` makes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from flashlab.hardware import spec
from flashlab.inputs import attention_inputs, causal_mask
from flashlab.online_softmax import State, empty_state, merge, state_lse

#: fewest keys per split for ``splits="auto"``: a chunk must be long enough to amortise its
#: partial state's write and read-back (2 + d_v numbers per query row) against its K/V reads
MIN_KEYS_PER_SPLIT = 256


class SplitStep(NamedTuple):
    """One entry of ``trace``: a chunk's partial state, or the running merge after folding it in.

    ``kind`` is ``"partial"`` (the state of keys ``cols`` alone) or ``"merge"`` (the state of keys
    ``0 .. cols[1]``, i.e. every chunk up to ``split`` merged); ``state`` holds copies shaped
    ``m, l (..., N_q)``, ``o (..., N_q, d_v)``.
    """

    kind: str
    split: int
    cols: tuple[int, int]
    state: State


def auto_splits(n_k: int, blocks: int, *, sm_count: int | None = None, blocks_per_sm: int = 1) -> int:
    """Splits that fill the GPU: ``ceil(sm_count * blocks_per_sm / blocks)``, at most ``ceil(N_k / 256)``.

    ``blocks``: thread blocks the grid has without splitting (one per batch x head x query block);
    ``sm_count`` defaults to the H200's (``data/hardware.json``); ``blocks_per_sm``: how many blocks
    an SM runs at once (1: the least that keeps every SM busy; a kernel with small blocks wants
    more, to have enough loads in flight). A chunk shorter than :data:`MIN_KEYS_PER_SPLIT` keys
    would cost more in partial states than it saves.
    """
    for name, value in (("n_k", n_k), ("blocks", blocks)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    sms = spec("H200")["sm_count"] if sm_count is None else sm_count
    want = math.ceil(sms * blocks_per_sm / max(blocks, 1))
    return max(1, min(want, math.ceil(n_k / MIN_KEYS_PER_SPLIT)))


def check_splits(splits, n_k: int, blocks: int) -> int:
    """``splits`` as a positive integer (``"auto"`` resolved by :func:`auto_splits`), else ValueError."""
    if isinstance(splits, str):
        if splits != "auto":
            raise ValueError(f"splits must be a positive integer or 'auto', got {splits!r}")
        return auto_splits(n_k, blocks)
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits must be a positive integer (>= 1) or 'auto', got {splits!r}")
    return int(splits)


def split_bounds(n_k: int, splits: int) -> list[tuple[int, int]]:
    """The key range ``[c0, c1)`` of every split: ``ceil(N_k / splits)`` keys each, the tail shorter."""
    chunk = math.ceil(n_k / splits) if n_k else 0
    return [(min(s * chunk, n_k), min((s + 1) * chunk, n_k)) for s in range(splits)]


def partial_state(q, k, v, scale: float, mask=None) -> State:
    """The :class:`State` of ``q (..., N_q, d)`` over one chunk ``k (..., n, d)``, ``v (..., n, d_v)``.

    Vectorised over the chunk: ``S = scale q k^T`` (``-inf`` where ``mask (N_q, n)`` is False),
    ``m = rowmax S``, ``P = exp(S - m)``, ``l = rowsum P``, ``o = P v / l``; a row that sees none of
    the chunk's keys gets the empty state ``(-inf, 0, 0)``. Arrays must share a float dtype.
    """
    if k.shape[-2] == 0:
        return empty_state(q.shape[:-1], v.shape[-1], q.dtype)
    s = scale * (q @ np.swapaxes(k, -1, -2))
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1)
    p = np.exp(s - np.where(np.isneginf(m), 0.0, m)[..., None])
    l = p.sum(axis=-1)  # noqa: E741 (the paper's name)
    o = (p @ v) / np.where(l > 0, l, 1.0)[..., None]
    return State(m, l, o)


def split_kv_attention(q, k, v, *, splits, causal=False, scale=None, return_lse=False, trace=None):
    """Exact attention as the merge of ``splits`` partial states over chunks of the keys.

    Shapes and conventions as :func:`flashlab.flash_attention`: ``q (..., N_q, d)`` (any
    ``N_q >= 1``, decoding has 1), ``k (..., N_k, d)``, ``v (..., N_k, d_v)``, leading dims
    broadcast, ``scale`` defaults to ``1/sqrt(d)``, ``causal`` is bottom-right aligned (query ``i``
    sees keys ``j <= i + N_k - N_q``), a row that sees no key gives 0 and lse ``-inf``, float16
    is computed in float32. ``splits``: a positive integer or ``"auto"`` (:func:`auto_splits` with
    one block per batch x head); more splits than keys leave empty chunks, which merge as nothing.
    ``trace``: optional list; gets a :class:`SplitStep` per chunk (``"partial"``) and per merge.

    Returns ``o (..., N_q, d_v)`` or ``(o, lse)``.
    """
    a = attention_inputs(q, k, v, scale)
    n_q, n_k = a.q.shape[-2], a.k.shape[-2]
    splits = check_splits(splits, n_k, math.prod(a.q.shape[:-2]))
    mask = causal_mask(n_q, n_k) if causal else None
    bounds = split_bounds(n_k, splits)
    states = []
    for s, (c0, c1) in enumerate(bounds):
        chunk_mask = None if mask is None else mask[:, c0:c1]
        states.append(partial_state(a.q, a.k[..., c0:c1, :], a.v[..., c0:c1, :], a.scale, chunk_mask))
        if trace is not None:
            trace.append(SplitStep("partial", s, (c0, c1), State(*(x.copy() for x in states[-1]))))

    state = states[0]
    for s in range(1, splits):  # the combine step: chapter 1's merge, one chunk at a time
        state = merge(state, states[s])
        if trace is not None:
            trace.append(SplitStep("merge", s, (0, bounds[s][1]), State(*(x.copy() for x in state))))
    o = state.o.astype(a.out_dtype, copy=False)
    return (o, state_lse(state)) if return_lse else o
