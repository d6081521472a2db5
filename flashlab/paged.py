"""A paged KV cache and decode-time attention over its pages (vLLM's PagedAttention, Kwon et al. 2023).

At decode time every sequence of a batch adds one token per step, and its keys and values must stay
in memory until it finishes. A **paged** cache splits that memory into ``num_pages`` fixed-size
**pages** of ``page_size`` token slots. A sequence owns a list of pages, its **block table**: token
``t`` lives in page ``block_table[t // page_size]``, slot ``t % page_size``. A sequence takes a page
from the free list only when its last page is full, and gives all its pages back when it finishes;
any free page serves any sequence. So a sequence wastes at most ``page_size - 1`` slots (the tail of
its last page), while a contiguous cache must reserve each request's maximum length up front.

Attention over pages (:func:`paged_attention`) treats each page as one key/value tile: a page's
partial state is computed with :func:`flashlab.flash.flash_attention` and the pages are combined
with chapter 1's :func:`flashlab.online_softmax.merge`, so the result equals attention over the
contiguous keys, whatever pages the block table points to.
"""

from __future__ import annotations

import numpy as np

from flashlab.flash import flash_attention
from flashlab.inputs import as_float_array, check_block
from flashlab.online_softmax import State, empty_state, merge, state_lse

FREE = -1  # a block-table entry that points to no page


class PagedKVCache:
    """K and V of many sequences in pages: ``k (num_pages, heads, page_size, d)``, ``v`` likewise with
    ``d_v``. ``tables[seq]`` is a sequence's block table (page indices, in token order) and
    ``lengths[seq]`` its number of tokens."""

    def __init__(
        self, num_pages: int, page_size: int, heads: int, d: int, d_v: int | None = None, dtype=np.float32
    ):
        self.num_pages, self.page_size = (
            check_block("num_pages", num_pages),
            check_block("page_size", page_size),
        )
        heads, d = check_block("heads", heads), check_block("d", d)
        d_v = d if d_v is None else check_block("d_v", d_v)
        self.k = np.zeros((self.num_pages, heads, self.page_size, d), dtype)
        self.v = np.zeros((self.num_pages, heads, self.page_size, d_v), dtype)
        self.free = list(range(self.num_pages))  # the lowest free page is taken first
        self.tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}

    def append(self, seq, k, v) -> None:
        """Append tokens ``k (heads, t, d)``, ``v (heads, t, d_v)`` to sequence ``seq`` (new or not),
        taking pages from the free list as its last page fills. ``MemoryError`` if none is left."""
        k, v = as_float_array("k", k), as_float_array("v", v)
        if k.shape[:1] + k.shape[2:] != self.k.shape[1:2] + self.k.shape[3:] or v.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"k, v must be (heads, tokens, d) = {self.k.shape[1]}, t, {self.k.shape[3]} and "
                f"(heads, tokens, d_v) with d_v = {self.v.shape[3]}, got k {k.shape}, v {v.shape}"
            )
        table, n = self.tables.setdefault(seq, []), self.lengths.get(seq, 0)
        for t in range(k.shape[1]):
            page, slot = divmod(n + t, self.page_size)
            if page == len(table):
                if not self.free:
                    raise MemoryError(f"paged KV cache full: all {self.num_pages} pages are in use")
                table.append(self.free.pop(0))
            self.k[table[page], :, slot] = k[:, t]
            self.v[table[page], :, slot] = v[:, t]
        self.lengths[seq] = n + k.shape[1]

    def release(self, seq) -> None:
        """Sequence ``seq`` has finished: its pages go back to the free list."""
        self.free = sorted(self.free + self.tables.pop(seq))
        del self.lengths[seq]

    def block_tables(self, seqs) -> tuple[np.ndarray, np.ndarray]:
        """``(tables (B, max pages), lengths (B,))`` of ``seqs`` as arrays, unused entries :data:`FREE`."""
        width = max((len(self.tables[s]) for s in seqs), default=0)
        tables = np.full((len(seqs), width), FREE, np.int64)
        for b, s in enumerate(seqs):
            tables[b, : len(self.tables[s])] = self.tables[s]
        return tables, np.array([self.lengths[s] for s in seqs], np.int64)

    def contiguous(self, seq) -> tuple[np.ndarray, np.ndarray]:
        """The keys and values of ``seq`` gathered in token order: ``(heads, n, d)``, ``(heads, n, d_v)``."""
        n, pages = self.lengths[seq], self.tables[seq]
        k, v = (x[pages].transpose(1, 0, 2, 3).reshape(x.shape[1], -1, x.shape[3]) for x in (self.k, self.v))
        return k[:, :n], v[:, :n]

    def slots(self) -> tuple[int, int]:
        """``(used, allocated)`` token slots: tokens stored, and slots of the pages in use."""
        used = sum(self.lengths.values())
        return used, self.page_size * (self.num_pages - len(self.free))


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, scale=None, return_lse=False):
    """Decode attention: one new query per sequence over its cached keys, read page by page.

    ``q (B, h_q, d)``; ``k_pages (num_pages, h_kv, page_size, d)``, ``v_pages`` likewise with ``d_v``
    (``h_q`` a multiple of ``h_kv``: grouped-query attention); ``block_tables`` integer ``(B, P)``;
    ``lengths`` integer ``(B,)``: sequence ``b`` has ``lengths[b]`` tokens in pages
    ``block_tables[b, :ceil(lengths[b] / page_size)]``, the last one possibly part full.
    Returns ``o (B, h_q, d_v)`` (0 for a sequence with no token) or ``(o, lse)`` with ``lse (B, h_q)``.
    """
    q, k_pages, v_pages = (
        as_float_array("q", q),
        as_float_array("k_pages", k_pages),
        as_float_array("v_pages", v_pages),
    )
    if q.ndim != 3 or k_pages.ndim != 4 or v_pages.shape[:3] != k_pages.shape[:3]:
        raise ValueError(
            "q must be (B, h_q, d) and k_pages, v_pages (num_pages, h_kv, page_size, d or d_v), got "
            f"q {q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape}"
        )
    num_pages, page_size = k_pages.shape[0], k_pages.shape[2]
    tables, lengths = _check_tables(block_tables, lengths, q.shape[0], num_pages, page_size)
    states = []
    for b in range(q.shape[0]):
        state = empty_state((q.shape[1], 1), v_pages.shape[-1], np.promote_types(q.dtype, np.float32))
        for p in range(-(-int(lengths[b]) // page_size)):  # one page = one key/value tile
            n = min(page_size, int(lengths[b]) - p * page_size)
            page = tables[b, p]
            o, lse = flash_attention(
                q[b, :, None],
                k_pages[page, :, :n],
                v_pages[page, :, :n],
                scale=scale,
                return_lse=True,
                block_q=1,
                block_k=page_size,
            )
            state = merge(state, State(lse, np.ones_like(lse), o))  # (m, l) = (lse, 1): same lse
        states.append(state)
    o = np.stack([s.o[:, 0] for s in states]).astype(np.result_type(q, k_pages, v_pages), copy=False)
    lse = np.stack([state_lse(s)[:, 0] for s in states])
    return (o, lse) if return_lse else o


def _check_tables(block_tables, lengths, batch, num_pages, page_size):
    """Integer tables ``(B, P)`` and lengths ``(B,)`` whose used entries point inside the cache."""
    tables, lengths = np.asarray(block_tables), np.asarray(lengths)
    if tables.ndim != 2 or tables.shape[0] != batch or tables.dtype.kind not in "iu":
        raise ValueError(
            f"block_tables must be integers of shape (B={batch}, pages), got {tables.dtype} {tables.shape}"
        )
    if lengths.shape != (batch,) or lengths.dtype.kind not in "iu" or np.any(lengths < 0):
        raise ValueError(f"lengths must be {batch} integers >= 0 (tokens per sequence), got {lengths!r}")
    for b, n in enumerate(lengths):
        pages = -(-int(n) // page_size)
        if pages > tables.shape[1]:
            raise ValueError(
                f"lengths[{b}]={n} needs {pages} pages of {page_size} slots, but block_tables has "
                f"{tables.shape[1]} columns"
            )
        bad = [(p, int(tables[b, p])) for p in range(pages) if not 0 <= tables[b, p] < num_pages]
        if bad:
            p, page = bad[0]
            raise ValueError(
                f"block_tables[{b}, {p}]={page} points past the cache: pages are 0 .. {num_pages - 1} "
                f"(sequence {b} has {n} tokens, so its first {pages} entries must be pages)"
            )
    return tables, lengths


def simulate(prompts, outputs, *, num_pages: int, page_size: int, max_len: int) -> list[dict]:
    """Serve requests (prompt and output lengths, in tokens) from a :class:`PagedKVCache` of
    ``num_pages`` pages: every step each running request adds one token; waiting requests are
    admitted in order while their prompt (and one more token, if any is to come) fits in the free
    pages. When a running request needs a page and none is free, the request admitted last is
    preempted: its pages are freed and it waits again, with what it had generated as prompt (vLLM's
    recomputation).

    Returns one dict per step: ``running`` requests, ``used`` token slots, ``paged`` slots held by their
    pages, ``contiguous`` slots a cache reserving ``max_len`` per running request would hold, and
    ``preempted`` requests so far. (K and V are zeros of one head of dim 1: only the bookkeeping matters.)
    """
    cache = PagedKVCache(num_pages, page_size, 1, 1)
    waiting = [
        (r, check_block("prompt", p), int(o)) for r, (p, o) in enumerate(zip(prompts, outputs, strict=True))
    ]
    left: dict[int, int] = {}  # running request -> tokens still to generate, in admission order
    steps, preempted = [], 0

    def tokens(n):
        return np.zeros((1, n, 1))

    while waiting or left:
        while waiting and len(cache.free) * page_size >= waiting[0][1] + min(waiting[0][2], 1):
            r, prompt, output = waiting.pop(0)
            cache.append(r, tokens(prompt), tokens(prompt))
            left[r] = output
        if not left:
            raise ValueError(
                f"request {waiting[0][0]} needs more than the {num_pages} pages of {page_size} slots"
            )
        for r in list(left):
            if r not in left:  # preempted earlier in this step
                continue
            if left[r] == 0:  # finished: its pages go back
                cache.release(r)
                del left[r]
                continue
            if cache.lengths[r] % page_size == 0 and not cache.free:
                victim = list(left)[-1]
                waiting.insert(0, (victim, cache.lengths[victim], left.pop(victim)))
                cache.release(victim)
                preempted += 1
                if victim == r:
                    continue
            cache.append(r, tokens(1), tokens(1))
            left[r] -= 1
        used, paged = cache.slots()
        steps.append(
            {
                "running": len(left),
                "used": used,
                "paged": paged,
                "contiguous": len(left) * max_len,
                "preempted": preempted,
            }
        )
    return steps
