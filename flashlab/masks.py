"""Masks as functions of (query index, key index), and the block mask that classifies every tile.

A **mask** is a function ``mask(q_idx, k_idx) -> bool`` that is True where query ``q_idx`` may attend
key ``k_idx`` (FlexAttention's ``mask_mod``, without its batch and head arguments). It is called on
NumPy integer arrays that broadcast against each other (a column of query indices, a row of key
indices) and must return booleans of their broadcast shape (or a shape that broadcasts to it). The
helpers below only use ``<=``, ``&``, ``|`` and indexing, so they run on torch tensors as well.

A **block mask** (:func:`block_mask`) evaluates the mask once, row block by row block, and gives every
``B_r x B_c`` tile ``(i, j)`` of the score matrix one of three classes:

- ``EMPTY``: no entry visible. The tile is skipped: K_j and V_j are not read for it.
- ``PARTIAL``: some entries visible. The tile is computed and the element mask applied (re-evaluated
  from the indices: a mask made of index arithmetic costs no HBM traffic).
- ``FULL``: every entry visible. The tile is computed without looking at the mask.

The causal tile skipping of :mod:`flashlab.tiles` is the case ``mask = causal(N_k - N_q)``.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import numpy as np

from flashlab.inputs import check_block
from flashlab.tiles import block_range, n_blocks

EMPTY, PARTIAL, FULL = 0, 1, 2
CLASS_NAMES = ("empty", "partial", "full")


# --- mask helpers --------------------------------------------------------------------------------
def causal(offset: int = 0):
    """Query ``q`` sees key ``k`` iff ``k <= q + offset`` (``offset = N_k - N_q``: bottom-right, as
    ``causal=True``; ``0``: top-left, as torch's ``is_causal``)."""
    offset = int(offset)

    def mask(q_idx, k_idx):
        return k_idx <= q_idx + offset

    return mask


def sliding_window(window: int, offset: int = 0):
    """Causal sliding window: query ``q`` sees the ``window`` keys ``q + offset - window < k <= q + offset``
    (itself and the ``window - 1`` before it, as Mistral's and Gemma's local layers)."""
    window, offset = check_block("window", window), int(offset)

    def mask(q_idx, k_idx):
        return (k_idx <= q_idx + offset) & (k_idx > q_idx + offset - window)

    return mask


def prefix_lm(prefix: int):
    """Prefix-LM: every query sees the first ``prefix`` keys (bidirectional), and causally after them."""
    if isinstance(prefix, bool) or not isinstance(prefix, (int, np.integer)) or prefix < 0:
        raise ValueError(f"prefix must be an integer >= 0 (keys every query sees), got {prefix!r}")
    prefix = int(prefix)

    def mask(q_idx, k_idx):
        return (k_idx < prefix) | (k_idx <= q_idx)

    return mask


def document(doc_ids, kv_doc_ids=None):
    """Block-diagonal: query ``q`` sees key ``k`` iff both belong to the same document (several sequences
    packed into one). ``doc_ids``: integer document id per query (``kv_doc_ids`` per key; default the
    same). Intersect with :func:`causal` for packed causal training."""
    q_ids = _ids("doc_ids", doc_ids)
    k_ids = q_ids if kv_doc_ids is None else _ids("kv_doc_ids", kv_doc_ids)

    def mask(q_idx, k_idx):
        return q_ids[q_idx] == k_ids[k_idx]

    return mask


def intersect(*masks):
    """Visible iff visible in every one of ``masks`` (FlexAttention's ``and_masks``)."""
    if not masks:
        raise ValueError("intersect needs at least one mask function")
    for m in masks:
        _check_signature(m)

    def mask(q_idx, k_idx):
        out = masks[0](q_idx, k_idx)
        for m in masks[1:]:
            out = out & m(q_idx, k_idx)
        return out

    return mask


def _ids(name, ids) -> np.ndarray:
    if hasattr(ids, "detach"):  # a torch tensor: keep it, so torch indices can index it
        return ids
    a = np.asarray(ids)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be a 1-D integer array (one document id per token), got {a.dtype} {a.shape}"
        )
    return a


# --- evaluating a mask ---------------------------------------------------------------------------
def _check_signature(mask) -> None:
    """``ValueError`` unless ``mask`` can be called as ``mask(q_idx, k_idx)``."""
    if not callable(mask):
        raise ValueError(f"mask must be a function mask(q_idx, k_idx) -> bool, got {type(mask).__name__}")
    try:
        inspect.signature(mask).bind(0, 0)
    except TypeError:
        raise ValueError(
            f"mask must take two arguments (q_idx, k_idx), got signature {inspect.signature(mask)}; a "
            "FlexAttention mask_mod(b, h, q_idx, kv_idx) becomes lambda q, k: mask_mod(0, 0, q, k)"
        ) from None
    except ValueError:  # no signature to inspect (some builtins): the call below decides
        pass


def evaluate(mask, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Boolean ``(rows, cols)`` array of ``mask`` on queries ``range(*rows)`` x keys ``range(*cols)``,
    True where visible. ``ValueError`` if ``mask`` has the wrong signature or returns something that
    is not booleans of (a shape broadcasting to) the tile's shape."""
    _check_signature(mask)
    q_idx, k_idx = np.arange(*rows)[:, None], np.arange(*cols)[None, :]
    shape = (q_idx.shape[0], k_idx.shape[1])
    out = mask(q_idx, k_idx)
    if hasattr(out, "detach"):
        out = out.detach().cpu().numpy()
    out = np.asarray(out)
    if out.dtype != np.bool_:
        raise ValueError(
            f"mask must return booleans (True = visible), got dtype {out.dtype} for a {shape} tile; "
            "compare instead of computing numbers (e.g. k_idx <= q_idx)"
        )
    try:
        return np.broadcast_to(out, shape)
    except ValueError:
        raise ValueError(
            f"mask must return one boolean per (query, key) pair: called on indices of shapes "
            f"{q_idx.shape} and {k_idx.shape} it returned shape {out.shape}, which does not broadcast "
            f"to {shape}; use elementwise operations on q_idx and k_idx"
        ) from None


def dense(mask, n_q: int, n_k: int) -> np.ndarray:
    """The whole boolean ``(N_q, N_k)`` mask (for references and pictures; O(N^2) memory)."""
    return evaluate(mask, (0, check_block("n_q", n_q)), (0, check_block("n_k", n_k))).copy()


class BlockMask(NamedTuple):
    """Tile classes of ``mask`` for ``block_q x block_k`` tiles of an ``n_q x n_k`` score matrix.

    ``classes``: int8 ``(T_r, T_c)`` of :data:`EMPTY`, :data:`PARTIAL`, :data:`FULL`.
    """

    classes: np.ndarray
    mask: object
    n_q: int
    n_k: int
    block_q: int
    block_k: int

    def tile(self, i: int, j: int) -> np.ndarray:
        """The element mask of tile ``(i, j)``, True where visible (re-evaluated from the indices)."""
        return evaluate(
            self.mask, block_range(i, self.block_q, self.n_q), block_range(j, self.block_k, self.n_k)
        )

    def counts(self) -> dict[str, int]:
        """Number of tiles per class name."""
        return {name: int(np.sum(self.classes == c)) for c, name in enumerate(CLASS_NAMES)}

    def keys_read(self) -> int:
        """Key columns of every non-empty tile, summed (FA2 reads K_j and V_j once per such tile)."""
        widths = np.diff(np.append(np.arange(self.classes.shape[1]) * self.block_k, self.n_k))
        return int(((self.classes != EMPTY) * widths[None, :]).sum())


def block_mask(mask, n_q: int, n_k: int, block_q: int, block_k: int) -> BlockMask:
    """Classify every tile of ``mask`` once: :data:`EMPTY`, :data:`PARTIAL` or :data:`FULL`.

    The mask is evaluated one row block at a time (``B_r x N_k`` booleans alive), as FlexAttention's
    ``create_block_mask`` does before the kernel runs.
    """
    n_q, n_k = check_block("n_q", n_q), check_block("n_k", n_k)
    block_q, block_k = check_block("block_q", block_q), check_block("block_k", block_k)
    t_r, t_c = n_blocks(n_q, block_q), n_blocks(n_k, block_k)
    starts = np.arange(t_c) * block_k
    classes = np.empty((t_r, t_c), np.int8)
    for i in range(t_r):
        rows = block_range(i, block_q, n_q)
        visible = np.add.reduceat(evaluate(mask, rows, (0, n_k)).sum(axis=0), starts)  # per key block
        size = (rows[1] - rows[0]) * np.diff(np.append(starts, n_k))
        classes[i] = np.where(visible == 0, EMPTY, np.where(visible == size, FULL, PARTIAL))
    return BlockMask(classes, mask, n_q, n_k, block_q, block_k)


def sliding_window_keys(n_q: int, n_k: int, window: int, block_q: int, block_k: int, offset: int = 0) -> int:
    """Closed form of :meth:`BlockMask.keys_read` for :func:`sliding_window`: one term per query block.

    Query block ``i`` (rows ``r0 .. r1 - 1``) sees keys ``r0 + offset - window + 1 .. r1 - 1 + offset``,
    so it computes the key blocks from ``floor(max(0, r0 + offset - window + 1) / B_c)`` to
    ``floor(min(N_k - 1, r1 - 1 + offset) / B_c)``, and reads every key of them. With ``B_r = B_c = B``
    dividing ``N`` and ``window``, that is ``window + B`` keys per query block, about
    ``(N / B)(window + B)`` in all, against about ``N^2 / (2B)`` causal.
    """
    n_q, n_k, window = check_block("n_q", n_q), check_block("n_k", n_k), check_block("window", window)
    block_q, block_k = check_block("block_q", block_q), check_block("block_k", block_k)
    keys = 0
    for i in range(n_blocks(n_q, block_q)):
        r0, r1 = block_range(i, block_q, n_q)
        lo, hi = max(0, r0 + offset - window + 1), min(n_k - 1, r1 - 1 + offset)
        if lo <= hi:
            keys += block_range(hi // block_k, block_k, n_k)[1] - (lo // block_k) * block_k
    return keys
