"""Chapter 2 exercises: FlashAttention-2's inner update for one tile, then the whole forward.

The learner writes ``tile_update(m, l, acc, s, v) -> (m_new, l_new, acc_new)``: the body of FA2's
inner loop over key blocks (Dao 2023, Algorithm 1) for a block of query rows, given their running max
``m``, running sum ``l`` and unnormalised accumulator ``acc``, and one tile of scaled scores ``S``
with its values ``V``. The checker walks tiles of real attention problems one at a time and, at
every step, compares the learner's new state with :func:`fa2_tile_update` started from the same
state, so each mistake is caught at the tile that reveals it: a max that arrives in a later tile,
logits past float32's ``exp`` limit, causal rows that have seen only ``-inf`` scores so far (tiles
visited in reverse, which the update allows), ragged tiles, a single query row.

:mod:`flashlab.flash` runs this step inside its loop on flat ``(batch, rows, ...)`` arrays and has
no standalone function for it, so the solution lives here; tests hold it to
:func:`flashlab.naive_attention`.
"""

from __future__ import annotations

import math

import numpy as np

from flashlab.attention import naive_attention
from flashlab.check import Mistake, exercise, expect
from flashlab.inputs import causal_mask
from flashlab.tolerance import attention_bound

EXP_LIMIT = {np.float32: math.log(np.finfo(np.float32).max), np.float64: math.log(np.finfo(np.float64).max)}


def fa2_tile_update(m, l, acc, s, v):  # noqa: E741 (the paper's name)
    """One step of FA2's inner loop for a block of query rows.

    ``m``, ``l`` ``(rows,)``: running max and sum of the scores seen so far (``-inf`` and ``0`` for
    a row that has seen none, or only masked ones); ``acc (rows, d_v)``: ``sum_j exp(s_j - m) v_j``,
    not yet divided by ``l``; ``s (rows, cols)``: the tile's scaled scores, ``-inf`` where masked;
    ``v (cols, d_v)``. Returns the new ``(m, l, acc)``; after the last tile ``O = acc / l``.
    """
    m_new = np.maximum(m, s.max(axis=1))  # the running max, never the tile's alone
    m_sub = np.where(np.isneginf(m_new), 0.0, m_new)  # a row with no score yet: exp(-inf - 0) = 0, not nan
    p = np.exp(s - m_sub[:, None])  # P = exp(S - m_new), at most 1
    alpha = np.exp(m - m_sub)  # rescales what was summed under the old max (0 for an empty row)
    l_new = alpha * l + p.sum(axis=1)
    acc_new = alpha[:, None] * acc + p @ v  # still unnormalised: divide by l once, at the end
    return m_new, l_new, acc_new


# --- the cases ------------------------------------------------------------------------------------


def score_tiles(q, k, v, block_k, *, causal=False, reverse=False):
    """``[(s, v_j), ...]``: the scaled score tiles ``S_j = Q K_j^T / sqrt(d)`` (``-inf`` where the
    bottom-right causal mask hides a key) and value tiles of one query block, key block by key block
    (last first when ``reverse``)."""
    s = (q @ k.T) / np.asarray(math.sqrt(q.shape[1]), q.dtype)
    if causal:
        s = np.where(causal_mask(len(q), len(k)), s, -np.inf).astype(q.dtype)
    starts = list(range(0, len(k), block_k))
    return [(s[:, c : c + block_k], v[c : c + block_k]) for c in (starts[::-1] if reverse else starts)]


def _cases():
    """``[(what, q, k, v, block_k, causal, reverse), ...]``; the first cases reveal the plainest mistakes."""
    rng = np.random.default_rng(5)

    def normal(*shape, spread=1.0, dtype=np.float64):
        return (rng.standard_normal(shape) * spread).astype(dtype)

    def f32(*shape, spread=1.0):
        return normal(*shape, spread=spread, dtype=np.float32)

    # Scores rise key after key: every tile brings a new max, so the old l and acc must be rescaled.
    rising_q, rising_k = normal(3, 4), normal(7, 4, spread=0.3)
    rising_q[:, 0], rising_k[:, 0] = 2.0, np.arange(7)
    late_max = "3 rows whose scores rise key after key (the max arrives late)"
    large = f"float32 logits far past {EXP_LIMIT[np.float32]:.1f}, the limit of exp"
    masked = "causal, N_q = 8 > N_k = 7, key tiles last first (rows see only -inf at first, row 0 always)"
    one_row = "one float32 query row, ragged tiles"
    return [
        (late_max, rising_q, rising_k, normal(7, 5), 3, False, False),
        (large, f32(4, 8, spread=12), f32(9, 8, spread=12), f32(9, 3), 4, False, False),
        (masked, normal(8, 4), normal(7, 4), normal(7, 2), 3, True, True),
        (one_row, f32(1, 6), f32(6, 6), f32(6, 4), 5, False, False),
    ]


# --- the checker ----------------------------------------------------------------------------------


def _close(got, want, dtype, rtol=None) -> bool:
    rtol = rtol or (2e-5 if dtype == np.float32 else 1e-10)
    return bool(np.allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max(initial=0)))))


def _call(fn, m, l, acc, s, v):  # noqa: E741
    """The learner's step on copies (in-place updates are fine), as float64 arrays of checked shapes."""
    with np.errstate(all="ignore"):
        try:
            out = fn(m.copy(), l.copy(), acc.copy(), s.copy(), v.copy())
        except OverflowError:
            raise Mistake(
                "OverflowError: exp of a large score overflows. Use P = exp(S - m_new), never exp(S)"
            ) from None
    expect(
        isinstance(out, tuple) and len(out) == 3,
        f"tile_update must return the triple (m_new, l_new, acc_new), got {type(out).__name__}",
    )
    got = [np.asarray(x, dtype=np.float64) for x in out]
    for name, x, shape in zip(
        ("m_new", "l_new", "acc_new"), got, ((len(m),), (len(m),), acc.shape), strict=True
    ):
        expect(x.shape == shape, f"{name} must have shape {shape} (one per query row), got {x.shape}")
    return got


def _diagnose(got, want, m, l, acc, s, v, dtype) -> str:  # noqa: E741
    """Words for the usual wrong steps (inputs and ``want`` as float64), a plain comparison otherwise."""
    g_m, g_l, g_acc = got
    w_m, w_l, w_acc = want
    empty = np.isneginf(w_m)
    if not (np.all(np.isfinite(g_l)) and np.all(np.isfinite(g_acc)) and not np.any(np.isnan(g_m))):
        if np.any(empty) or np.any(np.isnan(g_m)):
            return (
                "nan for a row whose scores are all -inf so far (a masked row): m = m_new = -inf, and "
                "exp(S - m_new) = exp(-inf - (-inf)) = exp(nan). Subtract 0 instead of m_new in such rows, "
                "np.where(m_new == -inf, 0, m_new): then P = exp(-inf) = 0, alpha = 0, and l, acc stay 0"
            )
        if np.max(s, where=np.isfinite(s), initial=-np.inf) > EXP_LIMIT[dtype]:
            return (
                f"l or acc is not finite: exp overflowed for scores above {EXP_LIMIT[np.float32]:.1f} "
                "(float32's exp limit). Use P = exp(S - m_new) and alpha = exp(m - m_new), never exp(S)"
            )
        if np.any(np.isneginf(m)):
            return (
                "nan for a row that had seen nothing yet (m = -inf, l = 0, acc = 0): the rescale must be "
                "alpha = exp(m_old - m_new) = exp(-inf) = 0; exp(m_new - m_old) = inf makes 0 * inf = nan"
            )
        return f"l or acc is not finite: got l = {g_l}, expected {w_l}"
    tile_max = s.max(axis=1)
    if not np.array_equal(g_m, w_m):
        if np.array_equal(g_m, tile_max):
            return (
                f"m_new = {g_m} is the tile's own rowmax(S); the running max is max(m, rowmax(S)) = {w_m}: "
                "it never decreases, and l and acc are relative to it"
            )
        return f"m_new = {g_m}, but the running max max(m, rowmax(S)) is {w_m}"
    p = np.exp(s - np.where(empty, 0.0, w_m)[:, None])
    p_tile = np.exp(s - np.where(np.isneginf(tile_max), 0.0, tile_max)[:, None])
    alpha = np.exp(m - np.where(empty, 0.0, w_m))
    inverse = np.exp(w_m - np.where(np.isneginf(m), w_m, m))  # exp(m_new - m_old), 1 for an empty row
    with np.errstate(all="ignore"):
        wrong_l = {
            "l was not rescaled: the old sum is relative to the old max, so multiply it by "
            "alpha = exp(m_old - m_new) before adding rowsum(P)": l + p.sum(axis=1),
            "l was rescaled the wrong way: multiply it by alpha = exp(m_old - m_new) (at most 1), "
            "not exp(m_new - m_old)": inverse * l + p.sum(axis=1),
            "P was taken relative to the tile's own max rowmax(S), but l and acc are relative to the "
            "running max: use P = exp(S - m_new)": alpha * l + p_tile.sum(axis=1),
            "P = exp(S) was not shifted: use P = exp(S - m_new), which is at most 1 (exp(S) overflows "
            f"for scores past {EXP_LIMIT[np.float32]:.1f} in float32)": alpha * l + np.exp(s).sum(axis=1),
        }
        wrong_acc = {
            "acc was not rescaled by alpha = exp(m_old - m_new) when the max grew: every old term "
            "exp(s - m_old) v must become exp(s - m_new) v, so acc_new = alpha acc + P V": acc + p @ v,
            "acc was divided by l inside the loop: FA2 keeps acc unnormalised (acc_new = alpha acc + P V) "
            "and divides by l once, after the last tile, so O is written once": w_acc
            / np.where(w_l > 0, w_l, 1)[:, None],
            "acc was rescaled the wrong way: multiply it by alpha = exp(m_old - m_new), "
            "not exp(m_new - m_old)": inverse[:, None] * acc + p @ v,
            "P was taken relative to the tile's own max rowmax(S), but acc is relative to the running "
            "max: use P = exp(S - m_new)": alpha[:, None] * acc + p_tile @ v,
        }
    if not _close(g_l, w_l, dtype):
        words = next((w for w, x in wrong_l.items() if _close(g_l, x, dtype, rtol=1e-4)), None)
        return words or f"l_new = {g_l}, expected alpha l + rowsum(P) = {w_l}"
    words = next((w for w, x in wrong_acc.items() if _close(g_acc, x, dtype, rtol=1e-4)), None)
    return words or f"acc_new = {g_acc.tolist()}, expected alpha acc + P V = {w_acc.tolist()}"


@exercise(
    "fa2_tile_update",
    chapter=2,
    title="FA2's inner update tile_update(m, l, acc, S, V) -> (m_new, l_new, acc_new)",
    solution=fa2_tile_update,
)
def check_fa2_tile_update(tile_update) -> None:
    """Every tile of each case, from the correct state before it; the first wrong step is explained."""
    for what, q, k, v, block_k, causal, reverse in _cases():
        dtype = q.dtype.type
        rows = len(q)
        m = np.full(rows, -np.inf, dtype)
        l = np.zeros(rows, dtype)  # noqa: E741
        acc = np.zeros((rows, v.shape[1]), dtype)
        for t, (s, v_j) in enumerate(score_tiles(q, k, v, block_k, causal=causal, reverse=reverse)):
            got = _call(tile_update, m, l, acc, s, v_j)
            with np.errstate(all="ignore"):
                want = fa2_tile_update(m, l, acc, s, v_j)
            wide = [np.asarray(x, np.float64) for x in (*want, m, l, acc, s, v_j)]
            ok = (
                np.array_equal(got[0], wide[0])
                and _close(got[1], wide[1], dtype)
                and _close(got[2], wide[2], dtype)
            )
            if not ok:
                raise Mistake(
                    f"{what}, tile {t} ({s.shape[0]} x {s.shape[1]} scores, {dtype.__name__}): "
                    + _diagnose(got, wide[:3], *wide[3:], dtype)
                )
            m, l, acc = want  # noqa: E741


# --- the whole forward -----------------------------------------------------------------------------


def fa2_forward(q, k, v, block_q, block_k, causal=False):
    """FlashAttention-2's whole forward for one head, from :func:`fa2_tile_update`.

    ``q (N_q, d)``, ``k (N_k, d)``, ``v (N_k, d_v)``; any positive blocks (need not divide N); ``causal``
    aligned bottom-right (query ``i`` sees key ``j`` iff ``j <= i + N_k - N_q``). Returns ``(o, lse)``:
    ``o (N_q, d_v)``, ``lse (N_q,)``; a row that sees no key gets ``o = 0``, ``lse = -inf``.
    """
    n_q, n_k = len(q), len(k)
    o, lse = np.zeros((n_q, v.shape[1]), q.dtype), np.full(n_q, -np.inf, q.dtype)
    for r0 in range(0, n_q, block_q):  # outer loop: query blocks, the last one ragged
        rows = np.arange(r0, min(r0 + block_q, n_q))
        m, l, acc = (  # noqa: E741
            np.full(len(rows), -np.inf, q.dtype),
            np.zeros(len(rows), q.dtype),
            np.zeros((len(rows), v.shape[1]), q.dtype),
        )  # noqa: E741
        for c0 in range(0, n_k, block_k):  # inner loop: key blocks
            cols = np.arange(c0, min(c0 + block_k, n_k))
            s = (q[rows] @ k[cols].T) / np.asarray(math.sqrt(q.shape[1]), q.dtype)
            if causal:
                s = np.where(cols[None, :] <= rows[:, None] + n_k - n_q, s, -np.inf).astype(q.dtype)
            m, l, acc = fa2_tile_update(m, l, acc, s, v[cols])  # noqa: E741
        seen = l > 0
        o[rows] = np.where(seen[:, None], acc / np.where(seen, l, 1)[:, None], 0)  # divide once, at the end
        with np.errstate(divide="ignore"):
            lse[rows] = np.where(seen, m + np.log(np.where(seen, l, 1)), -np.inf)
    return o, lse


def _forward_cases():
    """``[(what, q, k, v, block_q, block_k, causal), ...]``, plainest first."""
    rng = np.random.default_rng(11)

    def normal(*shape, spread=1.0, dtype=np.float64):
        return (rng.standard_normal(shape) * spread).astype(dtype)

    return [
        ("N = 32, blocks 8 x 8, no mask", normal(32, 8), normal(32, 8), normal(32, 5), 8, 8, False),
        (
            "ragged: N_q = 37, N_k = 50, blocks 16 x 16",
            normal(37, 8),
            normal(50, 8),
            normal(50, 3),
            16,
            16,
            False,
        ),
        (
            "causal, N_q = 20 < N_k = 45, blocks 8 x 16",
            normal(20, 4),
            normal(45, 4),
            normal(45, 3),
            8,
            16,
            True,
        ),
        (
            "causal, N_q = 30 > N_k = 12 (rows that see no key)",
            normal(30, 4),
            normal(12, 4),
            normal(12, 2),
            7,
            5,
            True,
        ),
        (
            "float32, logits in the hundreds",
            normal(24, 16, spread=8, dtype=np.float32),
            normal(40, 16, spread=8, dtype=np.float32),
            normal(40, 4, dtype=np.float32),
            16,
            8,
            False,
        ),
    ]


def _forward_diagnosis(got_o, got_lse, q, k, v, block_q, block_k, causal, bound) -> str | None:
    """Words for the likely mistake, or None when ``(got_o, got_lse)`` is right within ``bound``."""
    n_q, n_k = len(q), len(k)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    want_o, want_lse = naive_attention(q64, k64, v64, causal=causal, return_lse=True)
    dead = np.isneginf(want_lse)

    def close(a, b):
        return (
            a.shape == b.shape
            and bool(np.all(np.abs(np.nan_to_num(a - b)) <= bound.atol))
            and not np.any(np.isnan(a))
        )

    if np.any(np.isnan(got_o)) or np.any(np.isnan(got_lse)):
        if np.any(dead) and (np.any(np.isnan(got_o[dead])) or np.any(np.isnan(got_lse[dead]))):
            return (
                "nan in rows that see no key at all (causal with N_q > N_k): there l = 0, so acc / l is "
                "0 / 0. Such a row's output is 0 and its lse is -inf: divide only where l > 0"
            )
        return "nan from finite input: is every exp taken relative to the running max (exp(S - m_new))?"
    full_q, full_k = (n_q // block_q) * block_q, (n_k // block_k) * block_k
    if (full_q < n_q and np.allclose(got_o[full_q:], 0) and not np.allclose(want_o[full_q:], 0)) or (
        full_k < n_k and close(got_o, naive_attention(q64, k64[:full_k], v64[:full_k], causal=False))
    ):
        return (
            f"the last, partial block is missing (N_q = {n_q}, N_k = {n_k}, B_r = {block_q}, "
            f"B_c = {block_k}): loop over ceil(N / B) blocks, range(0, N, B),"
            " and cut each block at min(start + B, N)"
        )
    if causal:
        if close(got_o, naive_attention(q64, k64, v64)):
            return "the causal mask was not applied: set S to -inf where key j > i + N_k - N_q"
        top_left = np.where(np.tril(np.ones((n_q, n_k), bool)), q64 @ k64.T / math.sqrt(q.shape[1]), -np.inf)
        with np.errstate(all="ignore"):
            p = np.exp(top_left - top_left.max(axis=1, keepdims=True))
            tl = np.nan_to_num((p / p.sum(axis=1, keepdims=True)) @ v64)
        if close(np.nan_to_num(got_o), tl):
            return (
                "the causal mask is aligned top-left (j <= i), as torch's is_causal; this course aligns it "
                "bottom-right: query i sees key j iff j <= i + N_k - N_q"
            )
    if close(got_o, naive_attention(q64, k64, v64, causal=causal, scale=1.0)):
        return "the scores were not scaled: S = Q_i K_j^T / sqrt(d)"
    if not close(got_o, want_o):
        scores = q64 @ k64.T / math.sqrt(q.shape[1])
        if causal:
            scores = np.where(causal_mask(n_q, n_k), scores, -np.inf)
        row_max = np.max(scores, axis=1, initial=-np.inf)
        with np.errstate(invalid="ignore"):
            l_rows = np.where(dead, 0.0, np.exp(want_lse - np.where(dead, 0.0, row_max)))  # l relative to max
        if close(got_o, want_o * l_rows[:, None]):
            return "O was never divided by l: after the last key block, O_i = acc / l (once, per row)"
        worst = np.nanmax(np.abs(got_o - want_o))
        return f"O differs from attention by up to {worst:.3g} (allowed {bound.atol:.1e})"
    if not close(np.where(dead, 0, got_lse), np.where(dead, 0, want_lse)) or not np.all(
        np.isneginf(got_lse[dead])
    ):
        return "O is right but lse is not: lse_i = m_i + log l_i (and -inf for a row that sees no key)"
    return None


@exercise(
    "fa2_forward",
    chapter=2,
    title="the whole FA2 forward fa2_forward(q, k, v, block_q, block_k, causal) -> (o, lse)",
    solution=fa2_forward,
)
def check_fa2_forward(forward) -> None:
    """Each case against float64 attention within the derived bound; the first wrong one is explained."""
    for what, q, k, v, block_q, block_k, causal in _forward_cases():
        with np.errstate(all="ignore"):
            out = forward(q.copy(), k.copy(), v.copy(), block_q, block_k, causal)
        expect(
            isinstance(out, tuple) and len(out) == 2, f"return the pair (o, lse), got {type(out).__name__}"
        )
        o, lse = (np.asarray(x, np.float64) for x in out)
        expect(
            o.shape == (len(q), v.shape[1]),
            f"{what}: o must have shape {(len(q), v.shape[1])}, got {o.shape}",
        )
        expect(
            lse.shape == (len(q),),
            f"{what}: lse must have shape {(len(q),)} (one per query), got {lse.shape}",
        )
        bound = attention_bound(q, k, v, quantity="lse")  # the larger of the two bounds here
        bound = max(bound, attention_bound(q, k, v), key=lambda b: b.atol)
        words = _forward_diagnosis(o, lse, q, k, v, block_q, block_k, causal, bound)
        expect(words is None, f"{what}: {words}")
