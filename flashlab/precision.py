"""Number formats of the tensor core, emulated in NumPy: rounding to bf16, fp16 and TF32.

A tensor core multiplies 16-bit (or TF32) inputs and accumulates in float32. Which format the inputs
are rounded to decides how far attention lands from its float64 value:

================  ============  ===============  ==========================
format            mantissa bits  unit roundoff u  exponent range
================  ============  ===============  ==========================
float32 (fp32)    23             2^-24            8 bits (to 3.4e38)
tfloat32 (TF32)   10             2^-11            8 bits (fp32's range)
bfloat16 (bf16)   7              2^-8             8 bits (fp32's range)
float16 (fp16)    10             2^-11            5 bits (to 65504)
================  ============  ===============  ==========================

Rounding is to nearest, ties to even (as ``cvt.rn`` does on the GPU). The 16-bit formats travel as
their bit patterns (``uint16``), two to a 32-bit register: the layout ``mma.sync`` reads.
"""

from __future__ import annotations

import numpy as np

#: formats :func:`round_to` knows, with their number of explicit mantissa bits
MANTISSA_BITS = {"float32": 23, "tfloat32": 10, "bfloat16": 7, "float16": 10}
#: the 16-bit input formats of ``mma.sync`` m16n8k16
DTYPES16 = ("bfloat16", "float16")


def _check_dtype(dtype: str, allowed) -> str:
    if dtype not in allowed:
        raise ValueError(f"dtype: got {dtype!r}; use one of {', '.join(allowed)}")
    return dtype


def to_bits(x, dtype: str) -> np.ndarray:
    """The 16-bit patterns (``uint16``) of ``x`` rounded to ``dtype`` (``"bfloat16"`` or ``"float16"``).

    bf16 is the upper half of a float32, rounded to nearest even on the lower half; NaN stays NaN.
    """
    _check_dtype(dtype, DTYPES16)
    x32 = np.asarray(x, np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x32.astype(np.float16).view(np.uint16)
    u = x32.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x32), np.uint16(0x7FC0), rounded)


def from_bits(bits, dtype: str) -> np.ndarray:
    """float32 values of the 16-bit patterns ``bits`` in ``dtype`` (exact: both formats fit in fp32)."""
    _check_dtype(dtype, DTYPES16)
    b = np.asarray(bits, np.uint16)
    if dtype == "float16":
        return b.view(np.float16).astype(np.float32)
    return (b.astype(np.uint32) << 16).view(np.float32)


def round_to(x, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (one of :data:`MANTISSA_BITS`), returned as float32 values."""
    _check_dtype(dtype, tuple(MANTISSA_BITS))
    if dtype in DTYPES16:
        return from_bits(to_bits(x, dtype), dtype)
    x32 = np.asarray(x, np.float32)
    if dtype == "float32":
        return x32.copy()
    u = x32.view(np.uint32).astype(np.uint64)  # tfloat32: keep 10 of fp32's 23 mantissa bits
    drop = 23 - MANTISSA_BITS[dtype]
    half = (1 << (drop - 1)) - 1
    kept = ((u + half + ((u >> drop) & 1)) >> drop) << drop
    out = kept.astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(x32), out, x32)


#: the formats of the lesson, from exact to coarse: attention's inputs (and P) in each, fp32 sums
FORMATS = ("float64", "float32", "tfloat32", "bfloat16", "float16")


def emulated_attention(q, k, v, fmt: str, *, causal: bool = False, round_p: bool = True) -> np.ndarray:
    """Attention as a tensor core computes it in ``fmt``: q, k, v rounded to ``fmt``, ``S = q k^T`` and
    ``P V`` summed in float32, softmax in float32, ``P`` rounded to ``fmt`` before ``P V`` (the mma's
    inputs are ``fmt``) unless ``round_p=False``. ``fmt="float32"`` is chapter 4's fp32 FMA kernel;
    ``"float64"`` the reference. Shapes ``(..., N, d)``; returns float64 ``o``.
    """
    from flashlab.attention import naive_attention

    _check_dtype(fmt, FORMATS)
    if fmt == "float64":
        return naive_attention(q, k, v, causal=causal)
    qr, kr, vr = (round_to(x, fmt) for x in (q, k, v))
    scale = np.float32(1 / np.sqrt(qr.shape[-1]))
    s = (qr @ np.swapaxes(kr, -1, -2)) * scale
    if causal:
        n_q, n_k = s.shape[-2:]
        s = np.where(np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + n_k - n_q, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    l = p.sum(axis=-1, keepdims=True)  # noqa: E741 (the paper's l)
    if round_p:
        p = round_to(p, fmt)
    return ((p @ vr) / l).astype(np.float64)


def format_errors(q, k, v, *, causal: bool = False) -> dict[str, float]:
    """Max |o - o_float64| of :func:`emulated_attention` per format (P rounded), plus
    ``"<fmt>, P in float32"`` for the 16-bit formats: what rounding P costs."""
    ref = emulated_attention(q, k, v, "float64", causal=causal)
    errors = {}
    for fmt in FORMATS[1:]:
        errors[fmt] = float(np.abs(emulated_attention(q, k, v, fmt, causal=causal) - ref).max())
    for fmt in DTYPES16:
        o = emulated_attention(q, k, v, fmt, causal=causal, round_p=False)
        errors[f"{fmt}, P in float32"] = float(np.abs(o - ref).max())
    return errors


def plot_errors(errors: dict[str, float], bounds: dict[str, float] | None = None, ax=None):
    """Bars of :func:`format_errors` on a log scale, with each format's derived bound as a tick."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 3.2))[1]
    names = list(errors)
    ax.bar(
        range(len(names)), [max(errors[n], 1e-18) for n in names], color="tab:blue", label="max |o - o_64|"
    )
    if bounds:
        xs = [i for i, n in enumerate(names) if n in bounds]
        ax.scatter(
            xs, [bounds[names[i]] for i in xs], marker="_", s=400, color="tab:red", label="derived bound"
        )
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("error vs float64")
    ax.legend(loc="upper left")
    return ax


def tensor_core_bound(q, k, v, dtype: str, *, scale=None, rounded_inputs: bool = False):
    """Bound on ``max |o - o_ref|`` for attention on a tensor core: inputs, P and O in ``dtype``, every
    sum and the softmax in float32 (so :func:`flashlab.tolerance.attention_bound` at ``dtype`` would
    charge its ``gamma_n`` to sums that are really float32, and has no bound past ``n u >= 1``).

    Three parts, ``u`` the unit roundoff of ``dtype``: the float32 computation
    (``attention_bound(dtype="float32")``); rounding P (relative ``u`` per weight, numerator only) and
    O, at most ``2 u max|v|``; and, unless ``rounded_inputs`` (the reference already used the rounded
    q, k, v), rounding the inputs: each logit moves by at most ``e_in = (2u + u^2) scale max sum|q k|``,
    each weight by the factor ``exp(2 e_in)``, so o by ``2 eps / (1 - eps) max|v|`` with
    ``eps = exp(2 e_in) - 1``, plus ``u max|v|`` for V.
    """
    from flashlab.tolerance import Bound, attention_bound, unit_roundoff

    _check_dtype(dtype, FORMATS[1:])
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = 1 / np.sqrt(q64.shape[-1]) if scale is None else float(scale)
    u = unit_roundoff(dtype)
    vmax = float(np.max(np.abs(v64), initial=0.0))
    atol = attention_bound(q64, k64, v64, dtype="float32", scale=scale).atol + 2 * u * vmax
    formula = f"o on a tensor core in {dtype}: float32 sums, P and O rounded"
    if not rounded_inputs:
        worst = float(np.max(np.abs(q64) @ np.swapaxes(np.abs(k64), -1, -2), initial=0.0))
        eps = float(np.expm1(2 * (2 * u + u * u) * scale * worst))
        atol += (2 * eps / (1 - eps) if eps < 1 else np.inf) * vmax + u * vmax
        formula += ", inputs rounded"
    return Bound(atol, formula)
