"""Standard attention, the paper's Algorithm 0: materialise S and P, then O = P V.

This is the reference every faster implementation in the course is held to.
"""

from __future__ import annotations

import numpy as np

from flashlab.inputs import attention_inputs, causal_mask
from flashlab.memory import hbm, host, store


def naive_attention(q, k, v, *, causal=False, scale=None, return_lse=False, memory=None):
    """Softmax attention that forms the full ``N_q x N_k`` score matrix.

    Shapes: ``q (..., N_q, d)``, ``k (..., N_k, d)``, ``v (..., N_k, d_v)``; leading dims broadcast.
    Dtypes: float32 and float64 are kept; float16 is computed in float32 and returned as float16.

    Algorithm 0 of Dao et al. (2022), line by line:
      1. ``S = scale * Q K^T``            (written to HBM)
      2. ``P = softmax(S)`` row-wise      (S read, P written), made stable by the row max m:
         ``P = exp(S - m) / l`` with ``l = sum exp(S - m)``
      3. ``O = P V``                      (P and V read, O written)

    ``causal=True`` masks keys after the query, aligned to the **bottom-right** corner as in
    flash-attn: query ``i`` sees key ``j`` iff ``j <= i + N_k - N_q``. PyTorch's
    ``scaled_dot_product_attention(is_causal=True)`` aligns **top-left** (``j <= i``); pass it
    ``attn_mask=flashlab.inputs.causal_mask(N_q, N_k)`` to get this convention.
    A row that sees no key (possible when ``N_q > N_k``) gives output 0 and lse ``-inf``.

    ``memory``: an optional :class:`flashlab.memory.MemoryModel` that observes the HBM traffic of
    the three steps above: Q, K, V, S, P and O are HBM tensors it wraps (S and P go through HBM, as
    in the paper), and every slice taken or assigned is counted by the wrapper.

    Returns ``o (..., N_q, d_v)`` or, with ``return_lse``, ``(o, lse)`` where
    ``lse = m + log(l)`` has shape ``(..., N_q)`` (float32 or float64).
    """
    a = attention_inputs(q, k, v, scale)
    n_q, n_k = a.q.shape[-2], a.k.shape[-2]
    q, k, v = hbm(memory, "Q", a.q), hbm(memory, "K", a.k), hbm(memory, "V", a.v)  # counted per slice
    s = a.scale * (q[...] @ np.swapaxes(k[...], -1, -2))  # (..., N_q, N_k)
    if causal:
        s = np.where(causal_mask(n_q, n_k), s, -np.inf)
    s = store(memory, "S", s)[...]  # line 1 writes S to HBM; line 2 reads it back
    m = np.max(s, axis=-1, keepdims=True) if n_k else np.full(s.shape[:-1] + (1,), -np.inf, s.dtype)
    m_safe = np.where(m == -np.inf, 0.0, m)  # a row that sees no key: exp(-inf - 0) = 0, not nan
    p = np.exp(s - m_safe)
    l = np.sum(p, axis=-1, keepdims=True)  # noqa: E741 (the paper's name)
    empty = l == 0  # no visible key; NaN input keeps l NaN, so NaN flows through to o and lse
    with np.errstate(divide="ignore"):
        p = np.where(empty, 0.0, p / np.where(empty, 1.0, l))
        lse = np.where(empty, -np.inf, m_safe + np.log(l))[..., 0]
    p = store(memory, "P", p)[...]  # line 2 writes P; line 3 reads it back
    o = host(store(memory, "O", p @ v[...]))  # line 3 reads V and writes O
    o = o.astype(a.out_dtype, copy=False)
    return (o, lse) if return_lse else o
