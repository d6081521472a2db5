"""Chapter 1 exercises: the online softmax step, and the merge of two partial attention states.

Each checker feeds the learner's function the cases that catch the usual mistakes (a new max
arriving late, logits past float32's ``exp`` limit, ``-inf`` scores, empty states, many chunks
merged in any order) and names the mistake in words. The solutions are the course's own
:func:`~flashlab.online_softmax.online_update` and :func:`~flashlab.online_softmax.merge`.
"""

from __future__ import annotations

import numpy as np

from flashlab.check import Mistake, exercise, expect
from flashlab.online_softmax import State, chunk_state, merge, merge_in_any_order, online_update

EXP_LIMIT = {
    np.float32: float(np.log(np.finfo(np.float32).max)),
    np.float64: float(np.log(np.finfo(float).max)),
}


def _call(fn, what: str, *args):
    """``fn(*args)`` with NumPy warnings silenced; Python's OverflowError becomes a Mistake."""
    with np.errstate(all="ignore"):
        try:
            return fn(*args)
        except OverflowError:
            raise Mistake(
                f"{what} raised OverflowError: exp of a large logit overflows (past about "
                f"{EXP_LIMIT[np.float32]:.1f} in float32, {EXP_LIMIT[np.float64]:.1f} in float64); "
                "subtract the running max before exp"
            ) from None


def _close(actual, expected, dtype) -> bool:
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    return bool(np.allclose(actual, expected, rtol=rtol, atol=0.0, equal_nan=False))


# --- the online update ---------------------------------------------------------------------------


def _update(update, m, d, x, dtype=np.float64):
    """The learner's ``update`` on one step, as two floats, and the expected step."""
    m, d, x = dtype(m), dtype(d), dtype(x)
    what = f"update(m={m}, d={d}, x={x}) in {dtype.__name__}"
    out = _call(update, what, m, d, x)
    expect(
        isinstance(out, tuple) and len(out) == 2,
        f"update must return the pair (m_new, d_new), got {out!r}",
    )
    return what, (float(out[0]), float(out[1])), online_update(m, d, x)


def _diagnose_update(what, got, want, m, d, x) -> str:
    """Words for the usual wrong steps; a plain comparison otherwise."""
    m_new = max(m, x)
    if not np.isnan(got[0]) and got[0] != want[0]:
        return f"{what} returned m_new = {got[0]}; the running max must be max(m, x) = {want[0]}"
    if not (np.isfinite(got[1]) and (np.isfinite(got[0]) or got[0] == -np.inf)):
        if m_new == -np.inf:
            return (
                f"{what} gave nan: with m and x both -inf, exp(m - m_new) is exp(-inf - (-inf)) = exp(nan). "
                "While max(m, x) is still -inf there is nothing to add: return (m, d) unchanged"
            )
        if m_new > EXP_LIMIT[type(m_new)]:
            return (
                f"{what} gave d = {got[1]}: it overflows for logits > {EXP_LIMIT[np.float32]:.1f} "
                "(float32 exp limit): subtract the running max, i.e. add exp(x - m_new), never exp(x)"
            )
        if m == -np.inf:
            return (
                f"{what} gave nan for the first score: the old sum d = 0 must be rescaled by "
                "exp(m_old - m_new) = exp(-inf) = 0; exp(m_new - m_old) = inf makes 0 * inf = nan"
            )
        return (
            f"{what} gave {got}; an -inf score (a masked key) must add exp(-inf) = 0 and leave (m, d) as is"
        )
    with np.errstate(all="ignore"):
        wrong = {
            "the old denominator was not rescaled by exp(m_old - m_new) when the max grew: every old "
            "term exp(x_i - m_old) must become exp(x_i - m_new)": d + np.exp(x - m_new),
            "the old denominator was rescaled the wrong way: multiply it by exp(m_old - m_new) "
            "(at most 1), not exp(m_new - m_old)": d * np.exp(m_new - m) + np.exp(x - m_new),
            "the new score was not shifted: add exp(x - m_new), not exp(x), which overflows for logits "
            f"> {EXP_LIMIT[np.float32]:.1f} in float32": d * np.exp(m - m_new) + np.exp(x),
        }
    for words, value in wrong.items():
        if np.isclose(got[1], value):
            return f"{what}: {words}"
    return f"{what} returned {got}, expected ({want[0]}, {float(want[1])})"


@exercise(
    "online_update",
    chapter=1,
    title="the online softmax step update(m, d, x) -> (m_new, d_new)",
    solution=online_update,
)
def check_online_update(update) -> None:
    """Single steps that catch each usual mistake, then whole sequences folded from (-inf, 0)."""
    steps = [
        (-np.inf, 0.0, 0.5, np.float64),  # the first score
        (3.0, 2.0, 1.0, np.float64),  # a score below the max
        (1.0, 2.0, 3.0, np.float64),  # a new max: the old sum must be rescaled
        (-np.inf, 0.0, 1000.0, np.float32),  # far past float32's exp limit
        (500.0, 1.0, 1000.0, np.float32),
        (2.0, 1.0, -np.inf, np.float64),  # a masked score
        (-np.inf, 0.0, -np.inf, np.float64),  # masked scores before any other
    ]
    for m, d, x, dtype in steps:
        what, got, want = _update(update, m, d, x, dtype)
        if not (got[0] == float(want[0]) and _close(got[1], float(want[1]), dtype)):
            raise Mistake(_diagnose_update(what, got, want, dtype(m), dtype(d), dtype(x)))
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        for n in (1, 2, 7, 20):
            x = (rng.standard_normal(n) * rng.choice([1.0, 100.0, 1e4])).astype(dtype)
            if n > 2:
                x[rng.integers(n)] = -np.inf
            m, d = dtype(-np.inf), dtype(0.0)
            for xi in x:
                m, d = _call(update, "update", m, d, xi)
            top = x.max()
            want = np.sum(np.exp(x.astype(np.float64) - top))
            expect(
                float(m) == float(top) and _close(float(d), want, dtype),
                f"folding update over the {dtype.__name__} scores {x.tolist()} from (m, d) = (-inf, 0) "
                f"gave ({m}, {d}); expected m = max = {top} and d = sum exp(x - max) = {want:.9g}",
            )


# --- the merge of two partial states ---------------------------------------------------------------


def _state(*values, dtype=np.float64) -> State:
    m, l, o = values  # noqa: E741
    return State(dtype(m), dtype(l), np.asarray(o, dtype=dtype))


def _show(s: State) -> str:
    """A state in words, e.g. ``(m=1.0, l=1.0, o=[2.0, 0.0])``."""
    m, l, o = (np.round(np.asarray(x, dtype=float), 6).tolist() for x in s)  # noqa: E741
    return f"(m={m}, l={l}, o={o})"


def _merged(fn, a: State, b: State) -> State:
    what = f"merge(a={_show(a)}, b={_show(b)})"
    out = _call(fn, what, a, b)
    expect(
        isinstance(out, tuple) and len(out) == 3,
        f"merge must return the state (m, l, o), got {out!r}",
    )
    return State(*out)


def _diagnose_merge(got: State, want: State, a: State, b: State, dtype) -> str:
    what = f"merge(a={_show(a)}, b={_show(b)}) in {dtype.__name__}"
    if not (np.all(np.isfinite(got.l)) and np.all(np.isfinite(got.o))):
        if want.m == -np.inf:
            return (
                f"{what} gave {_show(got)}: merging two empty states (m = -inf) must give an empty state. "
                "With m = max(-inf, -inf) = -inf, exp(m_a - m) is exp(nan): use 0 instead of m when m is -inf"
            )
        return (
            f"{what} gave {_show(got)}: it overflows for logits > {EXP_LIMIT[np.float32]:.1f} "
            "(float32 exp limit): weigh each side by l exp(m_side - m) with m = max(m_a, m_b), "
            "never by exp(m_side)"
        )
    if got.m != want.m:
        return f"{what} gave m = {got.m}; the merged max must be max(m_a, m_b) = {want.m}"
    w_a, w_b = a.l * np.exp(a.m - want.m), b.l * np.exp(b.m - want.m)
    if not _close(got.l, want.l, dtype):
        if np.isclose(got.l, a.l + b.l):
            return (
                f"{what}: l = l_a + l_b adds sums taken relative to different maxima; bring both to the "
                "common max first: l = l_a exp(m_a - m) + l_b exp(m_b - m)"
            )
        return f"{what} gave l = {got.l}, expected l_a exp(m_a - m) + l_b exp(m_b - m) = {want.l}"
    wrong = {
        "o is the plain average of o_a and o_b; weigh each by its share of the denominator, "
        "l_a exp(m_a - m) / l and l_b exp(m_b - m) / l": (a.o + b.o) / 2,
        "o was weighted by l_a and l_b without the rescale exp(m_a - m), exp(m_b - m)": (
            a.l * a.o + b.l * b.o
        )
        / (a.l + b.l),
        "o was not divided by the merged l: o = (w_a o_a + w_b o_b) / l": w_a * a.o + w_b * b.o,
    }
    for words, value in wrong.items():
        if np.allclose(got.o, value):
            return f"{what}: {words}"
    return f"{what} gave o = {got.o}, expected {want.o}"


@exercise(
    "merge_states",
    chapter=1,
    title="merge(a, b) of two partial states (m, l, o) over disjoint keys",
    solution=merge,
)
def check_merge_states(fn) -> None:
    """Two-state cases that catch each usual mistake, then random chunkings merged in random orders."""
    empty = (-np.inf, 0.0, [0.0, 0.0])
    pairs = [
        ((1.0, 1.0, [2.0, 0.0]), (3.0, 1.0, [4.0, 1.0]), np.float64),
        ((2.0, 3.0, [1.0, -1.0]), (-1.0, 2.5, [0.5, 5.0]), np.float64),
        ((1000.0, 2.0, [1.0, 2.0]), (990.0, 3.0, [3.0, -4.0]), np.float32),
        (empty, (0.5, 2.0, [1.0, 3.0]), np.float64),
        ((0.5, 2.0, [1.0, 3.0]), empty, np.float64),
        (empty, empty, np.float64),
    ]
    for a, b, dtype in pairs:
        a, b = _state(*a, dtype=dtype), _state(*b, dtype=dtype)
        got, want = _merged(fn, a, b), merge(a, b)
        if not (got.m == want.m and _close(got.l, want.l, dtype) and _close(got.o, want.o, dtype)):
            raise Mistake(_diagnose_merge(got, want, a, b, dtype))
        swapped = _merged(fn, b, a)
        expect(
            _close(swapped.l, got.l, dtype) and _close(swapped.o, got.o, dtype),
            f"merge(b, a) differs from merge(a, b) for a={_show(a)}, b={_show(b)}: merge must be commutative",
        )
    rng = np.random.default_rng(2)
    for n_k in (1, 5, 17):
        q, k, v = (
            rng.standard_normal((1, 4)) * 3,
            rng.standard_normal((n_k, 4)),
            rng.standard_normal((n_k, 3)),
        )
        cuts = np.sort(rng.choice(np.arange(n_k + 1), size=rng.integers(1, 5)))
        bounds = [0, *cuts.tolist(), n_k]  # chunks may be empty
        chunks = [chunk_state(q, k[s:e], v[s:e]) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        chunks = [State(c.m[0], c.l[0], c.o[0]) for c in chunks]  # one query: scalars m, l and a vector o
        got = merge_in_any_order(chunks, rng, lambda a, b: _merged(fn, a, b))
        one_pass = chunk_state(q, k, v)
        want = State(one_pass.m[0], one_pass.l[0], one_pass.o[0])
        expect(
            got.m == want.m and _close(got.l, want.l, np.float64) and _close(got.o, want.o, np.float64),
            f"{n_k} keys split at {bounds} and merged in a random order gave o = {got.o}, but one pass over "
            f"all keys gives {want.o}: merging must not depend on the chunking or the order",
        )
