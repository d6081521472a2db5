"""Checking attention inputs once, for every implementation in the course.

Every attention function takes ``q (..., N_q, d)``, ``k (..., N_k, d)``, ``v (..., N_k, d_v)``
with broadcastable leading (batch, head) dims, and a softmax ``scale`` (default ``1/sqrt(d)``).
Bad input raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong value), and the
message names the argument, what it was, and what would be right.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Attention(NamedTuple):
    """Validated inputs: arrays broadcast over leading dims, in the compute dtype."""

    q: np.ndarray  # (*batch, N_q, d)
    k: np.ndarray  # (*batch, N_k, d)
    v: np.ndarray  # (*batch, N_k, d_v)
    scale: float
    out_dtype: np.dtype  # float16 inputs are computed in float32 and returned as float16


def as_float_array(name: str, x) -> np.ndarray:
    """``x`` as a floating NumPy array (torch tensors are accepted), else ``TypeError``."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise TypeError(
            f"{name} must be a floating-point array (float16, float32 or float64), "
            f"got dtype {a.dtype}; convert it with {name}.astype(np.float32)"
        )
    return a


def check_scale(scale, d: int) -> float:
    """The softmax scale: ``1/sqrt(d)`` if ``None``, else a finite positive number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0 (default 1/sqrt(d)), got {scale}")
    return scale


def check_block(name: str, value) -> int:
    """A block (tile) size: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}")
    return int(value)


def attention_inputs(q, k, v, scale=None) -> Attention:
    """Validate and broadcast ``q, k, v``; resolve ``scale``.

    Compute dtype: the promoted dtype of the three, with float16 lifted to float32.
    """
    q, k, v = as_float_array("q", q), as_float_array("k", k), as_float_array("v", v)
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., N, d), got shape {a.shape}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k's last dim (head dim d) must equal q's: q has d={q.shape[-1]}, "
            f"k has d={k.shape[-1]} (shapes q {q.shape}, k {k.shape})"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v must have as many rows as k (one value per key): k has N_k={k.shape[-2]}, "
            f"v has {v.shape[-2]} (shapes k {k.shape}, v {v.shape})"
        )
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be >= 1, got q {q.shape}, v {v.shape}")
    try:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(
            "leading (batch/head) dims of q, k, v must broadcast: got "
            f"q {q.shape[:-2]}, k {k.shape[:-2]}, v {v.shape[:-2]}"
        ) from None
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    compute = np.promote_types(dtype, np.float32)
    q = np.broadcast_to(q, batch + q.shape[-2:]).astype(compute, copy=False)
    k = np.broadcast_to(k, batch + k.shape[-2:]).astype(compute, copy=False)
    v = np.broadcast_to(v, batch + v.shape[-2:]).astype(compute, copy=False)
    return Attention(q, k, v, check_scale(scale, q.shape[-1]), dtype)


def causal_offset(n_q: int, n_k: int) -> int:
    """Bottom-right causal alignment: query ``i`` sees key ``j`` iff ``j <= i + causal_offset``."""
    return n_k - n_q


def causal_mask(n_q: int, n_k: int) -> np.ndarray:
    """Boolean ``(N_q, N_k)`` mask, True where query i may attend key j (bottom-right aligned).

    This is flash-attn's convention. PyTorch's ``is_causal=True`` aligns top-left instead
    (``j <= i``); the two agree only when ``N_q == N_k``.
    """
    return np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + causal_offset(n_q, n_k)


def check_saved(name: str, x, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A tensor saved by (or flowing into) the forward: floating, of exactly ``shape``."""
    a = as_float_array(name, x)
    if a.shape != shape:
        raise ValueError(
            f"{name} must have shape {shape} (what the forward returns for these q, k, v), got {a.shape}"
        )
    return a.astype(dtype, copy=False)


def backward_inputs(q, k, v, o, lse, do, scale=None):
    """Validate a backward's inputs: ``(Attention, o, lse, do)``, the last three of the forward's shapes
    (``o, do (..., N_q, d_v)``, ``lse (..., N_q)``, leading dims broadcast) in the compute dtype."""
    a = attention_inputs(q, k, v, scale)
    out_shape = a.q.shape[:-1] + a.v.shape[-1:]
    o = check_saved("o", o, out_shape, a.q.dtype)
    lse = check_saved("lse", lse, a.q.shape[:-1], a.q.dtype)
    do = check_saved("do", do, out_shape, a.q.dtype)
    return a, o, lse, do


def check_kernel_head_dims(d: int, d_v: int, dtype, supported) -> int:
    """Head dims and dtype a numba.cuda kernel takes: ``d`` in ``supported``, ``d_v == d``, float32."""
    supported = tuple(supported)
    if d not in supported:
        raise ValueError(
            f"head dim d={d} is not supported by the kernels; supported d: {supported} "
            "(flashlab.flash_attention, the NumPy version, takes any d)"
        )
    if d_v != d:
        raise ValueError(f"v's head dim must equal q's for the kernels: got d={d}, d_v={d_v}")
    if np.dtype(dtype) != np.float32:
        raise ValueError(
            f"the kernels compute in float32; got dtype {np.dtype(dtype)}. Pass float32 (or float16) "
            "arrays, e.g. q.astype(np.float32); flashlab.naive_attention handles float64"
        )
    return d


def shape_stand_in(name: str, x) -> np.ndarray:
    """A zero-byte float32 NumPy array with the shape of torch tensor ``x``, so that the checks above
    validate a tensor on the GPU without copying it; ``ValueError`` unless ``x`` is float32."""
    if str(x.dtype) != "torch.float32":
        raise ValueError(f"{name}: the kernels compute in float32, got a {x.dtype} tensor ({name}.float())")
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), tuple(x.shape), (0,) * x.dim())
