"""Chapter 4 exercises, checked in the CUDA simulator: the inner loop of ``rowwise``, then the whole kernel.

The learner writes ``key_step(q_row, k_tile, v_tile, jj, scale, m, l, acc) -> (m, l)``: the body
of the kernel's loop over the keys of one staged K/V tile (score, online-softmax update,
accumulate). The checker builds the real ``rowwise`` kernel around it
(:func:`flashlab.cuda.registry.make_kernel` with ``key_step=``), runs it in numba's simulator on cases
that catch the usual mistakes, and compares with :func:`flashlab.naive_attention`. The solution is
the course's own :func:`flashlab.cuda.forward.rowwise_key_step`.

The second exercise, ``rowwise_kernel``, is the whole kernel: ``kernel(q, k, v, o, lse, n_q, n_k,
scale, offset)`` with :data:`ROWS` threads per block and :data:`KEYS` keys per staged tile (no mask),
launched by the course's own launcher (:func:`run_kernel`) on cases that catch the usual mistakes
(online softmax across tiles, overflow, a half-empty last tile, threads without a row, several heads).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from flashlab.attention import naive_attention
from flashlab.check import Mistake, exercise, expect
from flashlab.cuda import launch
from flashlab.cuda.forward import rowwise_key_step, rowwise_source
from flashlab.cuda.registry import make_kernel
from flashlab.tolerance import attention_bound, check_close

D = 16
TILES = {"rows": 4, "keys": 4}


def run_rowwise(key_step, q, k, v, *, causal=False, scale=None):
    """``rowwise`` with ``key_step`` as its inner loop, in the simulator: ``(o, lse)`` for 2-d q, k, v."""
    n_q = q.shape[0]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    spec = make_kernel("rowwise", D, causal, key_step=key_step, **TILES)
    o = np.full((1, n_q, D), np.nan, np.float32)
    lse = np.full((1, n_q), np.nan, np.float32)
    q3, k3, v3 = (np.ascontiguousarray(x[None], np.float32) for x in (q, k, v))
    with warnings.catch_warnings():  # simulated threads: NumPy's errstate would not reach them
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            launch.run(spec, launch.forward_args({"q": q3, "k": k3, "v": v3}, o, lse, scale))
        except OverflowError:
            raise Mistake(
                "OverflowError inside the kernel: exp of a large score overflows. Subtract the running "
                "max: p = exp(s - m_new) and alpha = exp(m - m_new) with m_new = max(m, s)"
            ) from None
    return o[0], lse[0]


def _ramp(n_k: int, rising: bool, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query whose scores against the keys rise (or fall) key after key."""
    q = np.zeros((1, D), np.float32)
    q[0, 0] = 1.0
    k = rng.standard_normal((n_k, D)).astype(np.float32) * 0.1
    k[:, 0] = np.arange(n_k) * (1.0 if rising else -1.0)
    v = rng.standard_normal((n_k, D)).astype(np.float32)
    return q, k, v


def _wrong(o, lse, q, k, v, causal=False, scale=None) -> bool:
    want_o, want_lse = naive_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    finite = np.isfinite(want_lse)
    if not (np.all(np.isfinite(o)) and np.array_equal(np.isfinite(lse), finite)):
        return True
    return not (np.allclose(o, want_o, atol=1e-4) and np.allclose(lse[finite], want_lse[finite], atol=1e-4))


def _check_rowwise_step(key_step) -> None:
    rng = np.random.default_rng(4)
    # 1. huge logits: exp must never see a raw score
    q = rng.standard_normal((5, D)).astype(np.float32) * 30
    k = rng.standard_normal((7, D)).astype(np.float32) * 30
    v = rng.standard_normal((7, D)).astype(np.float32)
    o, lse = run_rowwise(key_step, q, k, v)
    expect(
        np.all(np.isfinite(o)),
        "with large scores (about 1e3) the output is not finite: exp overflowed. Use exp(s - m_new) "
        "and exp(m - m_new) with m_new = max(m, s), never exp(s)",
    )
    # 2. falling scores: the first key holds the max, so no rescaling is needed yet
    q, k, v = _ramp(7, rising=False, rng=rng)
    o, lse = run_rowwise(key_step, q, k, v, scale=0.5)
    if _wrong(o, lse, q, k, v, scale=0.5):
        expect(
            _wrong(o, lse, q, k, v, scale=1.0),
            "the answer ignores `scale`: the score is s = scale * (q . k), before the max and the exp",
        )
        raise Mistake(
            "wrong even when the scores fall (the max never changes after the first key): check the "
            "score s = scale * sum_c q_row[c] * k_tile[jj, c], p = exp(s - m_new), "
            "l = l * alpha + p and acc[c] = acc[c] * alpha + p * v_tile[jj, c]"
        )
    # 3. rising scores: every key raises the max, so the old l and acc must shrink by alpha
    q, k, v = _ramp(7, rising=True, rng=rng)
    o, lse = run_rowwise(key_step, q, k, v, scale=0.5)
    expect(
        not _wrong(o, lse, q, k, v, scale=0.5),
        "right when the max stays put but wrong when it grows: when m_new > m, multiply the old sum l "
        "AND every acc[c] by alpha = exp(m - m_new) before adding the new key's p and p * v",
    )
    # 4. random scale, causal with N_q != N_k, ragged tiles: the whole kernel around your step
    for n_q, n_k in ((6, 9), (9, 6)):
        q = rng.standard_normal((n_q, D)).astype(np.float32)
        k = rng.standard_normal((n_k, D)).astype(np.float32)
        v = rng.standard_normal((n_k, D)).astype(np.float32)
        for causal in (False, True):
            o, lse = run_rowwise(key_step, q, k, v, causal=causal, scale=0.3)
            expect(
                not _wrong(o, lse, q, k, v, causal=causal, scale=0.3),
                f"wrong on a random case (N_q={n_q}, N_k={n_k}, causal={causal}, scale=0.3) "
                "although the ramps pass: does your step use only key jj, and return (m_new, l_new)?",
            )


exercise(
    "rowwise_inner_loop",
    chapter=4,
    title="the rowwise kernel's inner loop (one key: score, online softmax, accumulate)",
    solution=rowwise_key_step,
)(_check_rowwise_step)


# --- the whole kernel: rowwise, written by the learner ---------------------------------------------
ROWS, KEYS = 4, 4  # the learner's kernel: ROWS threads per block (one query row each), KEYS keys per tile


def run_kernel(kernel, q, k, v, scale=0.25):
    """The learner's ``kernel(q, k, v, o, lse, n_q, n_k, scale, offset)`` (no mask) on 3-d ``(heads, N, D)``
    arrays in the simulator: grid ``(ceil(N_q / ROWS), heads)``, ``ROWS`` threads. Returns ``(o, lse)``."""
    from flashlab.cuda.forward import PARAMS, SIGNATURE, query_grid
    from flashlab.cuda.spec import KernelSpec

    heads, n_q, _ = q.shape
    spec = KernelSpec(
        "your kernel", D, False, kernel, PARAMS, query_grid(ROWS), (ROWS,), 0, SIGNATURE,
        (("rows", ROWS), ("keys", KEYS)), "sim",
    )  # fmt: skip
    o = np.full(q.shape, np.nan, np.float32)
    lse = np.full((heads, n_q), np.nan, np.float32)
    arrays = {name: np.ascontiguousarray(x, np.float32) for name, x in (("q", q), ("k", k), ("v", v))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        launch.run(spec, launch.forward_args(arrays, o, lse, scale))
    return o, lse


KERNEL_CASES = [  # (what, heads, n_q, n_k, spread, hint when wrong)
    ("one head, whole tiles (N_q = 4, N_k = 8)", 1, 4, 8, 1.0,
     "check the online softmax across tiles: m, l and acc carry over from one K/V tile to the next"),
    ("large scores (about 1e3)", 1, 4, 8, 30.0,
     "exp overflowed: use exp(s - m_new) and exp(m - m_new), never exp(s)"),
    ("N_k = 6: the last K/V tile is half empty", 1, 4, 6, 1.0,
     "the last tile holds N_k - j0 keys: stage only rows j0 + jj < n_k and stop the key loop there"),
    ("N_q = 6: the second block's last threads have no query row", 1, 6, 8, 1.0,
     "a thread with i >= n_q must still stage its share of K/V and meet the barriers, but read no q row "
     "and write no output"),
    ("two heads", 2, 4, 8, 1.0, "the head is cuda.blockIdx.y: index q, k, v, o, lse by it"),
]  # fmt: skip


def _check_whole_kernel(kernel) -> None:
    rng = np.random.default_rng(8)
    for what, heads, n_q, n_k, spread, hint in KERNEL_CASES:
        q = (rng.standard_normal((heads, n_q, D)) * spread).astype(np.float32)
        k = (rng.standard_normal((heads, n_k, D)) * spread).astype(np.float32)
        v = rng.standard_normal((heads, n_k, D)).astype(np.float32)
        try:
            o, lse = run_kernel(kernel, q, k, v)
        except IndexError as e:
            raise Mistake(f"{what}: an index past the end of an array ({e}). Hint: {hint}") from None
        except OverflowError:
            raise Mistake(f"{what}: OverflowError in exp. Hint: {KERNEL_CASES[1][-1]}") from None
        want_o, want_lse = naive_attention(
            *(x.astype(np.float64) for x in (q, k, v)), scale=0.25, return_lse=True
        )
        expect(np.all(np.isfinite(o)), f"{what}: some outputs are not finite or never written. Hint: {hint}")
        bound = attention_bound(q, k, v, dtype=np.float32, scale=0.25)
        try:
            check_close(o, want_o, bound, what="o")
            check_close(lse, want_lse, attention_bound(q, k, v, dtype=np.float32, scale=0.25, quantity="lse"))
        except AssertionError:
            raise Mistake(f"{what}: o or lse differs from naive attention. Hint: {hint}") from None


exercise(
    "rowwise_kernel",
    chapter=4,
    title="the whole rowwise kernel: stage K/V tiles in shared memory, online softmax per thread",
    solution=rowwise_source(D, ROWS, KEYS, False),
)(_check_whole_kernel)
