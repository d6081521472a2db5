"""FlashAttention as a differentiable torch op: ``loss.backward()`` through flashlab's own backward.

``flashlab.autograd.flash_attention(q, k, v)`` is a ``torch.autograd.Function``. Its forward saves
exactly ``q, k, v``, the output ``o`` and the row log-sum-exp ``lse`` (``N_q`` numbers per head), never
the ``N_q x N_k`` matrix P; its backward recomputes P tile by tile from ``lse`` (Algorithm 4).

Where it runs follows the tensors, with nothing copied between host and device:

- CUDA tensors (float32): the numba.cuda forward kernel of chapter 4 (:func:`flashlab.cuda.flash_attention`)
  and the backward kernel of chapter 5 (:func:`flashlab.cuda.flash_attention_backward`), on
  the tensors' own memory;
- CPU tensors (float32 or float64): the NumPy forward of chapter 2 (:func:`flashlab.flash.flash_attention`)
  and the NumPy backward of chapter 5 (:func:`flashlab.backward.flash_attention_backward`), on views of
  the tensors' memory; ``kernels=True`` runs the numba kernels instead, in numba's CUDA simulator
  when there is no GPU (exact, but slow: a few tiles only).

Causal masking is bottom-right aligned like the rest of the course; torch's
``scaled_dot_product_attention(is_causal=True)`` aligns top-left and agrees only when ``N_q == N_k``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from flashlab import device
from flashlab.backward import flash_attention_backward as numpy_backward
from flashlab.flash import flash_attention as numpy_forward


def _check(q, k, v, kernels: bool) -> None:
    """ValueError naming the argument for anything the forward and backward paths cannot take."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(x).__name__}; use torch.as_tensor({name})"
            )
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; put q, k, v on one device")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} is {x.dtype} but q is {q.dtype}; give q, k, v one dtype")
        if not x.is_contiguous():
            raise ValueError(f"{name} is not contiguous (strides {x.stride()}); pass {name}.contiguous()")
        if x.dim() < 2:
            raise ValueError(f"{name} must have shape (..., N, d), got {tuple(x.shape)}")
    if (
        not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2])
        or k.shape[-2] != v.shape[-2]
        or q.shape[-1] != k.shape[-1]
    ):
        raise ValueError(
            f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit: need "
            "q (..., N_q, d), k (..., N_k, d), v (..., N_k, d_v) with the same leading dims"
        )
    allowed = (torch.float32,) if kernels else (torch.float32, torch.float64)
    if q.dtype not in allowed:
        where = "the numba kernels compute" if kernels else "on the CPU it computes"
        raise ValueError(
            f"q, k, v are {q.dtype}; {where} in {' or '.join(map(str, allowed))}: pass q.float()"
        )
    if q.is_cuda and device.MODE != "gpu":
        raise ValueError(
            f"q, k, v are on {q.device} but numba kernels run in the simulator (FLASHLAB_DEVICE=sim); "
            "move them to the CPU, or restart without FLASHLAB_DEVICE=sim"
        )


class FlashAttention(torch.autograd.Function):
    """Forward: FlashAttention, saving ``o`` and ``lse``. Backward: Algorithm 4 from the saved ``lse``."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kernels, block_q, block_k):
        ctx.options = (causal, scale, kernels, block_q, block_k)
        if kernels:
            from flashlab.cuda import flash_attention as kernel_forward

            o, lse = kernel_forward(*_arrays(q, k, v), causal=causal, scale=scale, return_lse=True)
        else:
            o, lse = numpy_forward(
                *_arrays(q, k, v),
                causal=causal,
                scale=scale,
                block_q=block_q,
                block_k=block_k,
                return_lse=True,
            )
        o, lse = torch.as_tensor(o, device=q.device), torch.as_tensor(lse, device=q.device)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        causal, scale, kernels, block_q, block_k = ctx.options
        do = do.contiguous()
        if kernels:
            from flashlab.cuda import flash_attention_backward as kernel_backward

            grads = kernel_backward(*_arrays(q, k, v, o, lse, do), causal=causal, scale=scale)
        else:
            grads = numpy_backward(
                *_arrays(q, k, v, o, lse, do), causal=causal, scale=scale, block_q=block_q, block_k=block_k
            )
        return (*(torch.as_tensor(g, device=q.device) for g in grads), None, None, None, None, None)


def _arrays(*tensors):
    """CUDA tensors as they are (the kernels read them in place); CPU tensors as NumPy views, no copy."""
    return tuple(t.detach() if t.is_cuda else t.detach().numpy() for t in tensors)


def flash_attention(q, k, v, *, causal=False, scale=None, kernels=None, block_q=64, block_k=64):
    """Differentiable attention ``softmax(scale q k^T) v`` of torch tensors, computed by flashlab.

    Shapes: ``q (..., N_q, d)``, ``k (..., N_k, d)``, ``v (..., N_k, d_v)``, the same leading dims,
    contiguous, on one device. Returns ``o (..., N_q, d_v)`` in q's dtype; ``o.sum().backward()``
    fills ``q.grad``, ``k.grad``, ``v.grad``. ``causal``: bottom-right aligned (query ``i`` sees key
    ``j <= i + N_k - N_q``; a row that sees no key gives 0). ``scale`` defaults to ``1/sqrt(d)``.

    ``kernels``: ``None`` (default) picks the numba kernels for CUDA tensors and NumPy for CPU tensors;
    ``True`` on CPU tensors runs the kernels in the simulator (or copies to the GPU and back).
    Kernels: float32, ``d = d_v`` in {16, 32, 64, 128}. NumPy: float32 or float64, any ``d``, tiles of
    ``block_q x block_k``.
    """
    kernels = bool(getattr(q, "is_cuda", False)) if kernels is None else bool(kernels)
    if not kernels and getattr(q, "is_cuda", False):
        raise ValueError("kernels=False runs NumPy on the CPU; q, k, v are CUDA tensors: pass .cpu() copies")
    _check(q, k, v, kernels)
    return FlashAttention.apply(q, k, v, causal, scale, kernels, block_q, block_k)
