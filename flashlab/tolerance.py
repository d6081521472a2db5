"""How far a result may sit from its float64 reference, derived from the problem, never tuned.

Model (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 2-3): every operation rounds as
``fl(a op b) = (a op b)(1 + delta)``, ``|delta| <= u``, the unit roundoff of the compute dtype; a sum of
``n`` terms, in any order and any blocking, is off by at most ``gamma_n * sum|terms|`` with
``gamma_n = n u / (1 - n u)``. The bounds hold whichever BLAS kernel, thread count or summation order a
machine picks, because they assume nothing about the order.

For attention ``o = softmax(scale * q k^T) v`` (with ``lse = m + log l``):

- a logit ``s_ij`` is a length-``d`` dot product, then scaled (and, in the kernels, multiplied by log2 e):
  ``|ds_ij| <= e_s = gamma_{d+2} * scale * max_ij sum_t |q_it k_jt|``;
- a weight ``exp(s_ij - m_i)`` then carries a relative error of at most ``2 e_s + c u`` (``c`` covers
  ``exp``/``exp2``, whose implementations are correct to a few units in the last place);
- the row sum ``l`` and the sum ``sum_j p_ij v_j`` have ``n_k`` terms (plus one rescale per step of the
  online softmax, at most ``n_k`` of them), each adding ``gamma_{2 n_k}`` relative to the sum of magnitudes;
- ``o = acc / l`` divides two such quantities, so the relative errors add.

Together: ``|do| <= (2 (2 e_s + c u) + 2 gamma_{2 n_k} + u) * max|v|`` and
``|dlse| <= 2 e_s + gamma_{2 n_k} + c u + u * max|lse|``. The float64 reference's own error is the
same formula with ``u = 2^-53`` and is added. The bounds are worst cases: typical errors are far below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: unit roundoff ``u`` (half the distance from 1 to the next float) per dtype name
UNIT_ROUNDOFF = {
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "tfloat32": 2.0**-11,
    "float32": 2.0**-24,
    "float64": 2.0**-53,
}
EXP_ULPS = 4  # c above: exp, exp2 and log are correct to a few ulps (CUDA's ex2.approx: 2 ulps)


def dtype_name(dtype) -> str:
    """The name :data:`UNIT_ROUNDOFF` knows ``dtype`` by (NumPy dtype, torch dtype, or a name)."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in UNIT_ROUNDOFF:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    if name not in UNIT_ROUNDOFF:
        raise ValueError(f"dtype: no unit roundoff for {dtype!r}; use one of {sorted(UNIT_ROUNDOFF)}")
    return name


def unit_roundoff(dtype) -> float:
    """``u`` of ``dtype`` (a NumPy dtype, a torch dtype, or one of :data:`UNIT_ROUNDOFF`'s names)."""
    return UNIT_ROUNDOFF[dtype_name(dtype)]


def gamma(n: int, u: float) -> float:
    """``gamma_n = n u / (1 - n u)``: the relative bound on an ``n``-term sum in any order."""
    if n * u >= 1:
        raise ValueError(f"n: {n} terms at u={u:.2g} leave no bound (n u >= 1); use a wider dtype")
    return n * u / (1 - n * u)


@dataclass(frozen=True)
class Bound:
    """An absolute error bound and the derivation that produced it (print it next to the error)."""

    atol: float
    formula: str

    def __str__(self) -> str:
        return f"{self.atol:.2e} ({self.formula})"


def sum_bound(terms, dtype, *, what="sum") -> Bound:
    """Bound on the error of ``sum(terms, axis=-1)`` computed in ``dtype`` in any order or blocking.

    ``|fl(sum) - sum| <= gamma_n * sum|terms|`` (``n`` = the last axis' length), plus the float64
    reference's own ``gamma_n``; returns the largest over the leading axes. Use it for merge-order and
    chunking identities: two orders of the same sum differ by at most twice this.
    """
    a = np.abs(np.asarray(terms, np.float64))
    n = max(a.shape[-1], 1) if a.ndim else 1
    size = float(np.max(np.sum(a, axis=-1), initial=0.0)) if a.ndim else float(a)
    name = dtype_name(dtype)
    atol = (gamma(n, UNIT_ROUNDOFF[name]) + gamma(n, UNIT_ROUNDOFF["float64"])) * size
    return Bound(atol, f"{what} of {n} terms in {name}: gamma_{n} * max sum|terms| = {size:.3g}")


def softmax_bound(x, dtype=None) -> Bound:
    """Bound on ``max |p - p_ref|`` for ``p = softmax(x)`` over the last axis, computed in ``dtype``.

    Subtracting the max rounds ``x - m`` by ``u |x - m|``; ``exp`` adds ``c u``; the sum of ``n`` weights
    ``gamma_n``; the division ``u``. With ``p <= 1``: ``(2 (u max|x - m| + c u) + gamma_n + u)``.
    """
    x64 = np.asarray(x, np.float64)
    name = dtype_name(np.asarray(x).dtype if dtype is None else dtype)
    finite = np.where(np.isfinite(x64), x64, np.nan)
    with np.errstate(invalid="ignore"):
        spread = float(
            np.nan_to_num(np.nanmax(finite, axis=-1) - np.nanmin(finite, axis=-1)).max(initial=0.0)
        )
    n = max(x64.shape[-1], 1) if x64.ndim else 1

    def bound(u):
        return 2 * (u * spread + EXP_ULPS * u) + gamma(n, u) + u

    atol = bound(UNIT_ROUNDOFF[name]) + bound(UNIT_ROUNDOFF["float64"])
    return Bound(atol, f"softmax in {name} of {n} scores spread over {spread:.3g}")


def _logit_error(q, k, scale, u):
    """``e_s``: bound on the absolute error of one computed logit, from the actual inputs."""
    aq, ak = np.abs(q), np.abs(k)
    worst = float(np.max(aq @ np.swapaxes(ak, -1, -2), initial=0.0)) if aq.size and ak.size else 0.0
    return gamma(aq.shape[-1] + 2, u) * scale * worst


def attention_bound(q, k, v, *, dtype=None, scale=None, quantity="o") -> Bound:
    """Bound on ``max |x - x_ref|`` for ``x`` = attention's ``o`` or ``lse`` computed in ``dtype``.

    q: (..., N_q, d), k: (..., N_k, d), v: (..., N_k, d_v); ``dtype`` defaults to q's (float16 inputs
    computed in float32 pass ``dtype=np.float32``). ``quantity``: ``"o"`` or ``"lse"``.
    """
    if quantity not in ("o", "lse"):
        raise ValueError(f"quantity: got {quantity!r}; use 'o' or 'lse'")
    d, n_k = np.shape(q)[-1], np.shape(k)[-2]
    scale = 1 / np.sqrt(d) if scale is None else float(scale)
    name = dtype_name(np.asarray(q).dtype if dtype is None else dtype)
    q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
    if quantity == "o":
        size = float(np.max(np.abs(np.asarray(v, np.float64)), initial=0.0))  # max |v|
    else:
        logits = scale * q64 @ np.swapaxes(k64, -1, -2)
        size = float(np.max(np.abs(logits), initial=0.0)) + np.log(max(n_k, 1))  # max |lse|

    def bound(u):
        e_s, g = _logit_error(q64, k64, scale, u), gamma(2 * max(n_k, 1), u)
        if quantity == "o":
            return e_s, (2 * (2 * e_s + EXP_ULPS * u) + 2 * g + u) * size
        return e_s, 2 * e_s + g + EXP_ULPS * u + u * size

    (e_s, atol), (_, ref_atol) = bound(UNIT_ROUNDOFF[name]), bound(UNIT_ROUNDOFF["float64"])
    formula = (
        f"{quantity} in {name}: logit error e_s={e_s:.1e} from d={d}, {n_k} terms per sum;"
        f" + float64 reference {ref_atol:.0e}"
    )
    return Bound(atol + ref_atol, formula)


def attention_backward_bound(q, k, v, do, *, causal=False, dtype=None, scale=None) -> dict[str, Bound]:
    """Bounds on ``max |dq - dq_ref|``, ``dk``, ``dv`` for attention's backward computed in ``dtype``.

    Propagates the forward's errors through Algorithm 4 (FA2 arrangement) with float64 magnitudes:
    P recomputed from lse carries relative error ``eps_P = 4 e_s + 2 gamma_{2 n_k} + 2 c u``;
    ``dV = P^T dO``, ``dP = dO V^T``, ``D = rowsum(dO * O)``, ``dS = P * (dP - D)``, ``dQ = scale dS K``,
    ``dK = scale dS^T Q``, each product of length ``n`` adding ``gamma_n`` of its terms' magnitudes.
    Shapes as :func:`attention_bound`, ``do`` like the output; ``causal`` is bottom-right.
    """
    from flashlab.attention import naive_attention

    q64, k64, v64, do64 = (np.asarray(x, np.float64) for x in (q, k, v, do))
    n_q, d = q64.shape[-2:]
    n_k, d_v = v64.shape[-2:]
    scale = 1 / np.sqrt(d) if scale is None else float(scale)
    name = dtype_name(np.asarray(q).dtype if dtype is None else dtype)
    o, lse = naive_attention(q64, k64, v64, causal=causal, scale=scale, return_lse=True)
    s = scale * q64 @ np.swapaxes(k64, -1, -2)
    visible = np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + (n_k - n_q) if causal else True
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.where(visible & np.isfinite(lse)[..., None], np.exp(s - lse[..., None]), 0.0)
    dp = do64 @ np.swapaxes(v64, -1, -2)
    ds = p * (dp - np.sum(do64 * o, axis=-1, keepdims=True))
    ado, av, ak, aq = np.abs(do64), np.abs(v64), np.abs(k64), np.abs(q64)
    t = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
    out = {}
    for which in (name, "float64"):
        u = UNIT_ROUNDOFF[which]
        eps_p = 4 * _logit_error(q64, k64, scale, u) + 2 * gamma(2 * max(n_k, 1), u) + 2 * EXP_ULPS * u
        o_err = attention_bound(q, k, v, dtype=which, scale=scale).atol
        err_dp = gamma(d_v, u) * ado @ t(av)
        err_d = gamma(d_v, u) * np.sum(ado * np.abs(o), axis=-1, keepdims=True) + o_err * ado.sum(
            -1, keepdims=True
        )
        err_ds = eps_p * np.abs(ds) + p * (err_dp + err_d) + u * np.abs(ds)
        out[which] = {
            "dv": (eps_p + gamma(max(n_q, 1), u)) * t(p) @ ado,
            "dq": scale * (err_ds @ ak + gamma(max(n_k, 1), u) * np.abs(ds) @ ak),
            "dk": scale * (t(err_ds) @ aq + gamma(max(n_q, 1), u) * t(np.abs(ds)) @ aq),
        }
    return {
        key: Bound(
            float(np.max(out[name][key], initial=0.0) + np.max(out["float64"][key], initial=0.0)),
            f"{key} in {name}: forward errors carried through Algorithm 4, d={d}, n_q={n_q}, n_k={n_k}",
        )
        for key in ("dq", "dk", "dv")
    }


def check_close(actual, expected, bound: Bound, what: str = "output") -> float:
    """Raise ``AssertionError`` unless ``actual`` is within ``bound`` of ``expected``; return the error.

    ``-inf`` (rows that see no key) must sit in the same places; a non-finite value elsewhere from
    finite input fails by name.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} != expected {expected.shape}")
    same_inf = np.isinf(expected) & (actual == expected)
    if not np.array_equal(np.isinf(actual), np.isinf(expected)):
        raise AssertionError(f"{what}: the pattern of infinite values differs from the reference")
    a, e = np.where(same_inf, 0, actual), np.where(same_inf, 0, expected)
    if not np.all(np.isfinite(a)):
        raise AssertionError(f"{what}: {int(np.sum(~np.isfinite(a)))} non-finite values from finite input")
    err = float(np.max(np.abs(a - e), initial=0.0))
    if not err <= bound.atol:
        raise AssertionError(f"{what}: max error {err:.3g} exceeds the bound {bound}")
    return err
