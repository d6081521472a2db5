"""Launching the backward kernels of :mod:`flashlab.kernels_backward` on a GPU or in the simulator.

``flash_attention_backward(q, k, v, o, lse, do, causal=, scale=)`` runs the pre-pass
(``D = rowsum(dO * O)``, ``dQ = 0``) and then the backward kernel, wherever
:data:`flashlab.device.MODE` says kernels run: on the GPU, or in numba's CUDA simulator (the same
kernel source executed thread by thread in Python: exact, but slow, so keep it to a few blocks).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import cuda

from flashlab import device
from flashlab.backward import check_saved, gradients_to_inputs
from flashlab.gpu import allow_dynamic_shared
from flashlab.inputs import attention_inputs, causal_offset, check_scale
from flashlab.kernels_backward import (
    BACKWARD_TILES,
    HEAD_DIMS,
    PREPROCESS_THREADS,
    backward_source,
    preprocess_kernel,
    shared_bytes,
    threads_per_block,
)

# the signature the backward kernel is compiled for on a GPU (see flashlab.kernels_backward)
SIGNATURE = (
    "void(float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], "
    "float32[:, ::1], float32[:, ::1], float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], "
    "float32, int64)"
)


def _check_head_dims(d: int, d_v: int) -> None:
    if d not in HEAD_DIMS or d_v != d:
        raise ValueError(
            f"the backward kernel needs head dims d = d_v in {HEAD_DIMS}, got d={d}, d_v={d_v}; "
            "use flashlab.backward.flash_attention_backward (NumPy) for other sizes"
        )


@cache
def compiled(d: int, causal: bool):
    """:func:`~flashlab.kernels_backward.backward_source` compiled by ``numba.cuda.jit`` (fast math:
    ``exp2`` by the special-function unit), allowed the dynamic shared memory it needs."""
    if device.MODE != "gpu":
        return cuda.jit(backward_source(d, causal))
    bounds = (threads_per_block(d), BACKWARD_TILES[d]["blocks"])  # registers for that many blocks per SM
    kern = cuda.jit(SIGNATURE, fastmath=True, launch_bounds=bounds)(backward_source(d, causal))
    return allow_dynamic_shared(kern, shared_bytes(d))


def launch(q, k, v, o, lse, do, delta, dq, dk, dv, *, scale: float, causal: bool) -> None:
    """Run the pre-pass and the backward kernel on device arrays (numba, or anything with
    ``__cuda_array_interface__`` seen through ``cuda.as_cuda_array``).

    Shapes: ``q, o, do, dq (B, N_q, d)``, ``k, v, dk, dv (B, N_k, d)``, ``lse, delta (B, N_q)``, float32,
    C-contiguous. ``delta`` and ``dq`` are overwritten by the pre-pass; ``dk, dv`` by the kernel.
    """
    n_b, n_q, d = q.shape
    n_k = k.shape[1]
    if n_b == 0:
        return
    if n_q:
        preprocess_kernel[(math.ceil(n_q / PREPROCESS_THREADS), n_b), PREPROCESS_THREADS](o, do, delta, dq)
    if n_k:
        grid = (math.ceil(n_k / BACKWARD_TILES[d]["keys"]), n_b)
        compiled(d, bool(causal))[grid, threads_per_block(d), 0, shared_bytes(d)](
            q, k, v, do, lse, delta, dq, dk, dv, np.float32(scale), causal_offset(n_q, n_k)
        )


def _is_cuda_tensor(x) -> bool:
    return hasattr(x, "is_cuda") and x.is_cuda


def flash_attention_backward(q, k, v, o, lse, do, *, causal=False, scale=None):
    """Gradients ``(dq, dk, dv)`` of attention by the numba.cuda backward kernel, float32.

    Shapes: ``q, o, do (..., N_q, d)``, ``k, v (..., N_k, d)``, ``lse (..., N_q)`` (as the forward returns
    with ``return_lse=True``), ``d`` in ``{16, 32, 64, 128}``, any ``N_q, N_k``; bottom-right
    ``causal``; ``scale`` defaults to ``1/sqrt(d)``.

    - NumPy arrays (any float dtype, leading dims broadcast as in the forward): copied to the device
      as float32, gradients copied back, NumPy float32, shaped as ``q, k, v``.
    - torch CUDA tensors (float32, equal leading dims, on a GPU only): nothing is copied; the
      outputs are torch tensors allocated by torch, so ``torch.cuda.max_memory_allocated`` sees them.
    """
    if _is_cuda_tensor(q):
        return _backward_torch(q, k, v, o, lse, do, causal=causal, scale=scale)
    a = attention_inputs(q, k, v, scale)
    _check_head_dims(a.q.shape[-1], a.v.shape[-1])
    out_shape = a.q.shape[:-1] + a.v.shape[-1:]
    o = check_saved("o", o, out_shape, a.q.dtype)
    lse = check_saved("lse", lse, a.q.shape[:-1], a.q.dtype)
    do = check_saved("do", do, out_shape, a.q.dtype)
    n_b, lead = math.prod(a.q.shape[:-2]), a.q.ndim - 2
    host = [
        np.ascontiguousarray(x, np.float32).reshape((n_b,) + x.shape[lead:])
        for x in (a.q, a.k, a.v, o, lse, do)
    ]
    outs = [cuda.device_array(host[i].shape, np.float32) for i in (4, 0, 1, 2)]  # delta, dq, dk, dv
    launch(*(cuda.to_device(x) for x in host), *outs, scale=a.scale, causal=causal)
    grads = tuple(g.copy_to_host().reshape(x.shape) for g, x in zip(outs[1:], (a.q, a.k, a.v), strict=True))
    return gradients_to_inputs(a._replace(out_dtype=np.dtype(np.float32)), q, k, v, grads)


def _backward_torch(q, k, v, o, lse, do, *, causal, scale):
    """The device path for torch CUDA tensors: checks, then :func:`launch` on views of them."""
    import torch

    if device.MODE != "gpu":
        raise RuntimeError(
            "torch CUDA tensors were given but kernels run in the simulator (FLASHLAB_DEVICE=sim); "
            "pass NumPy arrays, or restart without FLASHLAB_DEVICE=sim"
        )
    d = q.shape[-1]
    _check_head_dims(d, v.shape[-1])
    lead, n_q, n_k = q.shape[:-2], q.shape[-2], k.shape[-2]
    expected = {
        "q": lead + (n_q, d), "k": lead + (n_k, d), "v": lead + (n_k, d),
        "o": lead + (n_q, d), "lse": lead + (n_q,), "do": lead + (n_q, d),
    }  # fmt: skip
    for (name, shape), x in zip(expected.items(), (q, k, v, o, lse, do), strict=True):
        if not (_is_cuda_tensor(x) and x.dtype == torch.float32 and tuple(x.shape) == shape):
            raise ValueError(
                f"{name} must be a float32 CUDA tensor of shape {shape} (like q), got "
                f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}"
            )
    n_b = math.prod(lead)
    ins = [x.detach().contiguous().reshape((n_b, *x.shape[len(lead) :])) for x in (q, k, v, o, lse, do)]
    outs = [torch.empty_like(ins[i]) for i in (4, 0, 1, 2)]  # delta, dq, dk, dv
    launch(*map(cuda.as_cuda_array, ins + outs), scale=check_scale(scale, d), causal=causal)
    return tuple(g.reshape(x.shape) for g, x in zip(outs[1:], (q, k, v), strict=True))
