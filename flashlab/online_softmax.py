"""Online softmax: one pass over the scores, with a running max and a rescaled running sum.

The chapter goes from the study note's loop to FlashAttention's building block:

1. :func:`notes_attention`: the note's loop, kept as written (it overflows for large logits);
2. :func:`naive_softmax`, :func:`safe_softmax`, :func:`online_softmax`: the three softmax loops of
   Milakov and Gimelshein (2018), written element by element so that :func:`count_accesses` can
   count their memory reads and writes (3, 4 and 3 per element);
3. :class:`State` and :func:`merge`: the partial result ``(m, l, o)`` of attention over some of the
   keys, and how two of them combine. :func:`chunk_state` folds the keys of a chunk one at a time
   into a state; :func:`online_attention` is that fold over all keys; :func:`merge_in_any_order`
   combines the states of many chunks in a random grouping and order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flashlab.inputs import as_float_array, attention_inputs, causal_mask


def notes_attention(Q, K, V, dtype=np.float64, trace=None) -> list[float]:
    """The study note's ``flash_attention`` loop, unchanged except that it keeps no globals.

    ``Q``, ``K``, ``V``: 1-d sequences of numbers (head dim 1, no softmax scale), ``len(K) == len(V)``.
    The arithmetic runs on NumPy scalars of ``dtype`` (the note uses Python floats, i.e. float64),
    so an overflow gives ``inf`` (and then ``nan``) instead of Python's ``OverflowError``.

    The flaw is kept on purpose: ``exp(q * k)`` is taken without subtracting a running max, so it
    overflows once ``q * k`` passes about 88 in float32 or 709 in float64.
    ``trace``: an optional list; each step appends ``(j, i, D_b, D[i], O[i])`` after the update.

    Returns a new list of ``len(Q)`` Python floats.
    """
    Q, K, V = (np.asarray(a, dtype=dtype) for a in (Q, K, V))
    for name, a in (("Q", Q), ("K", K), ("V", V)):
        if a.ndim != 1:
            raise ValueError(f"{name} must be a 1-d sequence of numbers (head dim 1), got shape {a.shape}")
    if len(K) != len(V):
        raise ValueError(f"K and V must have the same length (one value per key), got {len(K)} and {len(V)}")
    zero = np.dtype(dtype).type(0)
    D = [zero] * len(Q)
    O = [zero] * len(Q)  # noqa: E741 (the note's names)
    for j in range(len(K)):
        k, v = K[j], V[j]
        for i in range(len(Q)):
            q = Q[i]
            D_b = np.exp(q * k)  # current block denominator
            N_b = v * D_b  # current block numerator
            O[i] = (D[i] * O[i] + N_b) / (D[i] + D_b)
            D[i] += D_b
            if trace is not None:
                trace.append((j, i, D_b, D[i], O[i]))
    return [float(o) for o in O]


# --- Softmax, one element at a time ---------------------------------------------------------------


class Counted:
    """A 1-d array that counts every element read (``a[i]``) and written (``a[i] = x``).

    Wrap the input and output of a softmax loop in it to count memory accesses, as in
    :func:`count_accesses`.
    """

    def __init__(self, data: np.ndarray):
        self.data = data
        self.dtype = data.dtype
        self.reads = 0
        self.writes = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.data[i]

    def __setitem__(self, i: int, value) -> None:
        self.writes += 1
        self.data[i] = value


def _vector(x, out):
    """``x`` as a 1-d float array (a :class:`Counted` passes through) and the output to write."""
    if not isinstance(x, Counted):
        x = as_float_array("x", x)
        if x.ndim != 1:
            raise ValueError(f"x must be a 1-d vector of scores, got shape {x.shape}")
    if out is None:
        out = np.empty(len(x), dtype=x.dtype)
    elif len(out) != len(x):
        raise ValueError(f"out must have the length of x ({len(x)}), got {len(out)}")
    return x, out


def naive_softmax(x, out=None):
    """``exp(x_i) / sum_j exp(x_j)``: 2 passes, 3 memory accesses per element. Overflows.

    ``x``: 1-d float array (float32 stays float32). Pass 1 reads ``x`` to sum ``exp``; pass 2
    reads ``x`` again and writes ``y``. ``exp(x)`` is inf once ``x`` passes about 88 (float32)
    or 709 (float64), and then ``inf / inf = nan`` (all ``-inf`` gives ``0 / 0 = nan`` too).
    Returns ``y`` (``out`` if given).
    """
    x, y = _vector(x, out)
    d = 0.0
    for i in range(len(x)):
        d += np.exp(x[i])
    for i in range(len(x)):
        y[i] = np.exp(x[i]) / d
    return y


def safe_softmax(x, out=None):
    """``exp(x_i - m) / sum_j exp(x_j - m)`` with ``m = max(x)``: 3 passes, 4 accesses per element.

    Subtracting the max changes nothing mathematically (the factor ``exp(-m)`` cancels) but every
    exponent is now ``<= 0``, so ``exp`` cannot overflow, and the max term contributes 1, so the
    sum is ``>= 1``. ``-inf`` entries give 0; all ``-inf`` (nothing to attend to) gives all 0.
    """
    x, y = _vector(x, out)
    m = -np.inf
    for i in range(len(x)):
        m = max(m, x[i])
    if m == -np.inf:  # no finite score: an empty softmax, returned as zeros
        for i in range(len(x)):
            y[i] = 0.0
        return y
    d = 0.0
    for i in range(len(x)):
        d += np.exp(x[i] - m)
    for i in range(len(x)):
        y[i] = np.exp(x[i] - m) / d
    return y


def online_update(m, d, x):
    """One step of the online softmax (Milakov and Gimelshein 2018, Algorithm 3, lines 4-5).

    ``m``: the max of the scores seen so far (``-inf`` before the first), ``d``: the sum of
    ``exp(score - m)`` over them (0 before the first), ``x``: the next score. Returns the new
    ``(m, d)``: ``m_new = max(m, x)`` and ``d_new = d * exp(m - m_new) + exp(x - m_new)``; the factor
    ``exp(m - m_new)`` re-expresses the old sum relative to the new max.
    """
    m_new = max(m, x)
    if m_new == -np.inf:  # only -inf scores so far: nothing to add (and -inf - -inf would be nan)
        return m, d
    return m_new, d * np.exp(m - m_new) + np.exp(x - m_new)


def online_softmax(x, out=None):
    """Safe softmax with the max and the sum found in one pass: 3 accesses per element.

    Pass 1 reads ``x`` once, folding each score into ``(m, d)`` with :func:`online_update`;
    pass 2 reads ``x`` and writes ``y = exp(x - m) / d``. Same results as :func:`safe_softmax`.
    """
    x, y = _vector(x, out)
    m, d = -np.inf, 0.0
    for i in range(len(x)):
        m, d = online_update(m, d, x[i])
    for i in range(len(x)):
        y[i] = np.exp(x[i] - m) / d if d > 0 else 0.0
    return y


def count_accesses(softmax, x) -> dict[str, float]:
    """Run ``softmax(x)`` on :class:`Counted` arrays; return reads, writes and accesses per element."""
    x = as_float_array("x", x)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"x must be a non-empty 1-d vector, got shape {x.shape}")
    xs, ys = Counted(x), Counted(np.empty_like(x))
    with np.errstate(all="ignore"):  # the naive loop may overflow; only the counts matter here
        softmax(xs, out=ys)
    n = len(x)
    reads, writes = (xs.reads + ys.reads) / n, (xs.writes + ys.writes) / n
    return {"reads": reads, "writes": writes, "accesses": reads + writes}


# --- Attention over a set of keys: the partial state and its merge -------------------------------


class State(NamedTuple):
    """Attention of queries over a subset of the keys, enough to combine with other subsets.

    ``m (..., N_q)``: max score over the subset (``-inf`` if the subset is empty or fully masked);
    ``l (..., N_q)``: ``sum exp(score - m)`` over the subset (0 if empty);
    ``o (..., N_q, d_v)``: the attention output over the subset alone (0 if empty).
    The log-sum-exp of the subset's scores is ``m + log(l)``.
    """

    m: np.ndarray
    l: np.ndarray  # noqa: E741 (the paper's name)
    o: np.ndarray


def merge(a: State, b: State) -> State:
    """Combine the states of two disjoint key sets into the state of their union.

    With ``m = max(m_a, m_b)`` both sums are re-expressed relative to ``m``:
    ``w_a = l_a exp(m_a - m)``, ``w_b = l_b exp(m_b - m)``, ``l = w_a + w_b``, and the output is
    the average of the two outputs weighted by their shares of the denominator,
    ``o = (w_a o_a + w_b o_b) / l`` (Dao et al. 2022, Algorithm 1, lines 11-12).
    Commutative exactly, associative up to rounding. An empty state (``m = -inf``, ``l = 0``)
    is the identity, and two empty states give an empty state, without nan.
    """
    m = np.maximum(a.m, b.m)
    m_ref = np.where(m == -np.inf, 0.0, m)  # both empty: exp(-inf - 0) = 0, not exp(nan)
    w_a = a.l * np.exp(a.m - m_ref)
    w_b = b.l * np.exp(b.m - m_ref)
    l = w_a + w_b  # noqa: E741
    o = (w_a[..., None] * a.o + w_b[..., None] * b.o) / np.where(l > 0, l, 1.0)[..., None]
    return State(m, l, o)


def merge_in_any_order(states: list[State], rng: np.random.Generator, merge_fn=merge) -> State:
    """Merge the states of disjoint key sets, joining two picked at random until one is left.

    Every grouping and every order can come up; since :func:`merge` is associative and commutative,
    the result is the state of all the keys (up to rounding) whichever comes up.
    """
    states = list(states)
    while len(states) > 1:
        i, j = sorted(rng.choice(len(states), size=2, replace=False))
        b, a = states.pop(j), states.pop(i)
        states.append(merge_fn(a, b))
    return states[0]


def empty_state(n_q_shape: tuple[int, ...], d_v: int, dtype=np.float64) -> State:
    """The state of no keys: ``m = -inf``, ``l = 0``, ``o = 0``; the identity of :func:`merge`."""
    return State(
        np.full(n_q_shape, -np.inf, dtype), np.zeros(n_q_shape, dtype), np.zeros(n_q_shape + (d_v,), dtype)
    )


def chunk_state(q, k, v, *, scale=None, mask=None) -> State:
    """The state of queries ``q`` over the key chunk ``k, v``, folding in one key at a time.

    Shapes: ``q (..., N_q, d)``, ``k (..., n, d)``, ``v (..., n, d_v)`` (``n`` may be 0: an empty
    chunk); ``mask``: optional bool ``(N_q, n)``, False where a query may not see a key.
    ``scale`` defaults to ``1/sqrt(d)``. Computed in float32 or float64 (float16 -> float32).

    Key ``j`` alone has the state ``(s_j, 1, v_j)`` (its score, ``exp(0)``, its value), so folding
    it in with :func:`merge` is the note's update with the running max added:
    ``m' = max(m, s_j)``, ``l' = l exp(m - m') + exp(s_j - m')``,
    ``o' = (l exp(m - m') o + exp(s_j - m') v_j) / l'``.
    """
    a = attention_inputs(q, k, v, scale)
    n_q, n_k = a.q.shape[-2], a.k.shape[-2]
    if mask is not None and np.shape(mask) != (n_q, n_k):
        raise ValueError(f"mask must have shape (N_q, n) = {(n_q, n_k)}, got {np.shape(mask)}")
    state = empty_state(a.q.shape[:-1], a.v.shape[-1], a.q.dtype)
    for j in range(n_k):
        s = a.scale * (a.q @ a.k[..., j, :, None])[..., 0]  # (..., N_q): every query's score for key j
        seen = np.ones(n_q, bool) if mask is None else np.asarray(mask)[:, j]
        key = State(np.where(seen, s, -np.inf), seen.astype(s.dtype), a.v[..., j, None, :])
        state = merge(state, key)
    return state


def state_lse(state: State) -> np.ndarray:
    """The log-sum-exp ``m + log(l)`` of a state's scores, ``-inf`` where it saw no key."""
    with np.errstate(divide="ignore"):
        return np.where(state.l > 0, state.m + np.log(state.l), -np.inf)


def online_attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """Attention in one pass over the keys, never forming the score matrix.

    Same conventions as :func:`flashlab.attention.naive_attention`: ``q (..., N_q, d)`` (or one
    query ``(d,)``), ``k (..., N_k, d)``, ``v (..., N_k, d_v)``, ``scale`` default ``1/sqrt(d)``,
    ``causal`` aligned bottom-right, a query that sees no key gives 0 (lse ``-inf``), float16 is
    computed in float32. Returns ``o (..., N_q, d_v)`` (``(d_v,)`` for one query) or ``(o, lse)``.
    Extra memory: ``m`` and ``l``, two numbers per query, instead of an ``N_q x N_k`` matrix.
    """
    one_query = np.ndim(q) == 1
    if one_query:
        q = as_float_array("q", q)[None, :]
    a = attention_inputs(q, k, v, scale)
    mask = causal_mask(a.q.shape[-2], a.k.shape[-2]) if causal else None
    state = chunk_state(a.q, a.k, a.v, scale=a.scale, mask=mask)
    o, lse = state.o.astype(a.out_dtype, copy=False), state_lse(state)
    if one_query:
        o, lse = o[..., 0, :], lse[..., 0]
    return (o, lse) if return_lse else o
