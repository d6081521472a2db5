"""The backward pass: gradients of attention from the saved ``lse``, P recomputed tile by tile.

Given the forward's inputs ``q, k, v``, its output ``o``, its log-sum-exp ``lse`` and the
gradient ``do = dL/dO``, attention's gradients are (row-wise, with ``P = softmax(scale Q K^T)``)::

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - D)          with D_i = rowsum(dP_i * P_i) = rowsum(dO_i * O_i)
    dQ = scale dS K
    dK = scale dS^T Q

:func:`naive_attention_backward` is the standard backward (the paper's Algorithm 3): P, dP and dS
are whole ``N_q x N_k`` matrices that go through HBM. :func:`flash_attention_backward` is the
paper's Algorithm 4 in FlashAttention-2's arrangement: outer loop over K/V blocks (dK_j, dV_j
accumulated on chip), inner loop over Q blocks, P recomputed from ``lse`` (one number per row,
never an ``N_q x N_k`` array), ``D`` computed once in a pre-pass, dQ accumulated in HBM.
"""

from __future__ import annotations

import numpy as np

from flashlab.inputs import attention_inputs, backward_inputs, causal_mask, check_block, check_saved
from flashlab.memory import hbm, host, store
from flashlab.tiles import block_range, first_row_block, n_blocks, tile_mask, tile_needs_mask


def _shape(x) -> tuple[int, ...]:
    """The shape of an array-like (NumPy array, torch tensor, nested lists) before broadcasting."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` over the leading dims that broadcasting added or stretched, back to ``shape``."""
    lead = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(lead))) if lead else grad
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=stretched, keepdims=True) if stretched else grad


def gradients_to_inputs(a, q, k, v, grads):
    """Cast ``(dq, dk, dv)`` to the output dtype and sum them back to the shapes of ``q, k, v``."""
    return tuple(
        _unbroadcast(g, _shape(x)).astype(a.out_dtype, copy=False)
        for g, x in zip(grads, (q, k, v), strict=True)
    )


def naive_attention_backward(q, k, v, do, *, causal=False, scale=None, memory=None):
    """The standard backward, the paper's Algorithm 3: P, dP and dS are whole matrices in HBM.

    Shapes: ``q (..., N_q, d)``, ``k (..., N_k, d)``, ``v (..., N_k, d_v)``, ``do (..., N_q, d_v)``
    (leading dims as the forward's output, i.e. broadcast). Returns ``(dq, dk, dv)`` shaped as
    ``q, k, v``, in the forward's output dtype. Causal masking is bottom-right (see
    :func:`flashlab.attention.naive_attention`).

    ``P`` is the matrix Algorithm 0 wrote to HBM in the forward. NumPy keeps no tensor between two
    calls, so it is formed again here, *uncounted*: on a GPU it is the stored forward tensor, and
    the backward only reads it. With ``memory`` (a :class:`flashlab.memory.MemoryModel`) the HBM
    tensors Q, K, V, dO, P and the stored dV, dP, dS, dQ, dK are wrapped
    (:func:`flashlab.memory.hbm`), so every whole-matrix read and write of the lines below is
    counted by the wrapper, not declared:

      1. read P, dO; ``dV = P^T dO``; write dV
      2. read dO, V; ``dP = dO V^T``; write dP
      3. read P, dP; ``dS = P * (dP - rowsum(P * dP))`` (the row sum on chip); write dS
      4. read dS, K; ``dQ = scale dS K``; write dQ
      5. read dS, Q; ``dK = scale dS^T Q``; write dK
    """
    a = attention_inputs(q, k, v, scale)
    n_q, n_k = a.q.shape[-2], a.k.shape[-2]
    do = check_saved("do", do, a.q.shape[:-1] + a.v.shape[-1:], a.q.dtype)
    s = a.scale * (a.q @ np.swapaxes(a.k, -1, -2))
    if causal:
        s = np.where(causal_mask(n_q, n_k), s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))  # a fully masked row: all zeros, no nan
    l = np.sum(p, axis=-1, keepdims=True)  # noqa: E741 (the paper's name)
    p = p / np.where(l > 0, l, 1.0)
    qq, kk, vv = hbm(memory, "Q", a.q), hbm(memory, "K", a.k), hbm(memory, "V", a.v)  # counted per slice
    p, do = hbm(memory, "P", p), hbm(memory, "dO", do)
    dv = store(memory, "dV", np.swapaxes(p[...], -1, -2) @ do[...])  # line 1
    dp = store(memory, "dP", do[...] @ np.swapaxes(vv[...], -1, -2))  # line 2
    p_, dp_ = p[...], dp[...]  # line 3
    ds = store(memory, "dS", p_ * (dp_ - np.sum(p_ * dp_, axis=-1, keepdims=True)))
    dq = store(memory, "dQ", a.scale * (ds[...] @ kk[...]))  # line 4
    dk = store(memory, "dK", a.scale * (np.swapaxes(ds[...], -1, -2) @ qq[...]))  # line 5
    return gradients_to_inputs(a, q, k, v, (host(dq), host(dk), host(dv)))


def row_dot(do, o, *, block_q: int = 64, memory=None) -> np.ndarray:
    """``D = rowsum(dO * O)``, shape ``(..., N_q)``: the pre-pass of FlashAttention-2's backward.

    Algorithm 4 computes ``D_i`` on line 19, inside the inner loop, loading ``O_i`` once per K/V
    block. It depends on the row only, so FlashAttention-2 computes it once, block by block
    (read ``O_i``, ``dO_i``; write ``D_i``), and the inner loop then loads ``B_r`` numbers instead
    of the ``B_r x d_v`` tile ``O_i``. ``do``, ``o``: arrays, or the HBM tensors of
    :func:`flashlab.memory.hbm`. With ``memory``, O, dO and D are HBM tensors whose slices it
    counts; ``O_i``, ``dO_i`` are held on chip. Returns D as an array.
    """
    o, do = hbm(memory, "O", o), hbm(memory, "dO", do)
    out = hbm(memory, "D", np.empty(o.shape[:-1], dtype=o.dtype))
    for i0 in range(0, o.shape[-2], block_q):
        o_i, do_i = o[..., i0 : i0 + block_q, :], do[..., i0 : i0 + block_q, :]
        if memory is not None:
            memory.hold("O", o_i)
            memory.hold("dO", do_i)
        out[..., i0 : i0 + block_q] = np.sum(do_i * o_i, axis=-1)
    if memory is not None:
        memory.free("O", "dO")
    return host(out)


def flash_attention_backward(
    q, k, v, o, lse, do, *, block_q=64, block_k=64, causal=False, scale=None, memory=None
):
    """Gradients ``(dq, dk, dv)`` of attention, tile by tile, from ``lse`` (Algorithm 4, FA2 order).

    Shapes: ``q (..., N_q, d)``, ``k (..., N_k, d)``, ``v (..., N_k, d_v)``; ``o`` and ``do``
    ``(..., N_q, d_v)``, ``lse (..., N_q)`` as returned by the forward (``return_lse=True``) for
    the same ``q, k, v, causal, scale``. Returns ``(dq, dk, dv)`` shaped as ``q, k, v`` (summed
    over broadcast leading dims), in the forward's output dtype (float16 computed in float32).
    Any positive block sizes; N need not be a multiple of them. Causal is bottom-right, and tiles
    entirely above the diagonal are skipped. A query row that sees no key (``lse = -inf``) has
    ``P = 0`` and gets zero gradient.

    The lines of the paper's Algorithm 4, with FlashAttention-2's changes (``lse`` instead of
    ``l, m``; ``D`` in a pre-pass; see :func:`row_dot`). With ``memory`` (a
    :class:`flashlab.memory.MemoryModel`), Q, K, V, O, dO, lse, D, dQ, dK and dV are HBM tensors
    (:func:`flashlab.memory.hbm`): every slice the loops take is counted as a read and every slice
    they assign as a write, by the wrapper (observed); the tiles on chip are declared with
    ``hold``/``free`` (modelled).

    - pre-pass: ``D = rowsum(dO * O)`` (read O, dO; write D)
    - line 5: dQ = 0 in HBM (allocation, not traffic); dK, dV are never zeroed in HBM
    - line 6: for each K/V block j:
        - line 7: load K_j, V_j
        - line 8: dK_j = dV_j = 0 on chip
        - line 9: for each Q block i (causal: from the first block that sees K_j):
            - line 10: load Q_i, dO_i, dQ_i, lse_i, D_i
            - lines 11-13: ``S = scale Q_i K_j^T``, masked, ``P = exp(S - lse_i)``
            - line 16: ``dV_j += P^T dO_i``
            - line 17: ``dP = dO_i V_j^T``
            - line 20: ``dS = P * (dP - D_i)``
            - line 21: ``dQ_i += scale dS K_j``, written to HBM (read-modify-write)
            - line 22: ``dK_j += scale dS^T Q_i``
        - line 24: write dK_j, dV_j
    """
    a, o, lse, do = backward_inputs(q, k, v, o, lse, do, scale)
    block_q, block_k = check_block("block_q", block_q), check_block("block_k", block_k)
    n_q, n_k = a.q.shape[-2], a.k.shape[-2]
    count = memory is not None
    qq, kk, vv = hbm(memory, "Q", a.q), hbm(memory, "K", a.k), hbm(memory, "V", a.v)  # counted per slice
    o, do, lse = hbm(memory, "O", o), hbm(memory, "dO", do), hbm(memory, "lse", lse)
    delta = hbm(memory, "D", row_dot(do, o, block_q=block_q, memory=memory))  # pre-pass
    dq = hbm(memory, "dQ", np.zeros_like(a.q))  # line 5
    dk, dv = hbm(memory, "dK", np.empty_like(a.k)), hbm(memory, "dV", np.empty_like(a.v))
    for j in range(n_blocks(n_k, block_k)):  # line 6
        j0, j1 = block_range(j, block_k, n_k)
        k_j, v_j = kk[..., j0:j1, :], vv[..., j0:j1, :]  # line 7
        dk_j, dv_j = np.zeros_like(k_j), np.zeros_like(v_j)  # line 8
        if count:
            for name, tile in (("K", k_j), ("V", v_j), ("dK", dk_j), ("dV", dv_j)):
                memory.hold(name, tile)
        # Line 9; causal: Q blocks before the first that sees K_j are skipped (not loaded, not computed).
        for i in range(first_row_block(j, n_q, n_k, block_q, block_k, causal), n_blocks(n_q, block_q)):
            i0, i1 = block_range(i, block_q, n_q)
            q_i, do_i, dq_i = qq[..., i0:i1, :], do[..., i0:i1, :], dq[..., i0:i1, :]  # line 10
            lse_i, d_i = lse[..., i0:i1, None], delta[..., i0:i1, None]
            if count:
                for name, tile in (("Q", q_i), ("dO", do_i), ("dQ", dq_i), ("lse", lse_i), ("D", d_i)):
                    memory.hold(name, tile)
            s = a.scale * (q_i @ np.swapaxes(k_j, -1, -2))  # line 11
            if causal and tile_needs_mask(i, j, n_q, n_k, block_q, block_k):  # line 12
                s[..., tile_mask((i0, i1), (j0, j1), n_q, n_k)] = -np.inf
            p = np.exp(s - np.where(np.isfinite(lse_i), lse_i, 0.0))  # line 13 (S, P: one tile)
            dv_j += np.swapaxes(p, -1, -2) @ do_i  # line 16
            dp = do_i @ np.swapaxes(v_j, -1, -2)  # line 17
            ds = p * (dp - d_i)  # line 20 (dP and dS share one on-chip tile)
            if count:
                memory.hold("P", p)
                memory.hold("dS", ds)
            dq[..., i0:i1, :] = dq_i + a.scale * (ds @ k_j)  # line 21
            dk_j += a.scale * (np.swapaxes(ds, -1, -2) @ q_i)  # line 22
        dk[..., j0:j1, :], dv[..., j0:j1, :] = dk_j, dv_j  # line 24
        if count:
            memory.free("K", "V", "dK", "dV", "Q", "dO", "dQ", "lse", "D", "P", "dS")
    return gradients_to_inputs(a, q, k, v, (host(dq), host(dk), host(dv)))
