"""A PyTorch bridge: the NumPy forward and backward as one ``torch.autograd.Function``.

``flashlab.torch.flash_attention(q, k, v)`` behaves like any differentiable torch op, so
``loss.backward()`` runs :func:`flashlab.flash.flash_attention` forward and
:func:`flashlab.backward.flash_attention_backward` backward. Between the two, the function saves
``q, k, v``, the output ``o`` and the row log-sum-exp ``lse`` (``N_q`` numbers per head), never the
``N_q x N_k`` matrix P: the backward recomputes P tile by tile from ``lse``.

It runs on the CPU in NumPy (tensors on a GPU are copied to the host and the gradients back), so
it is for learning and checking, not for speed. Causal masking is bottom-right aligned like the
rest of the course; torch's ``scaled_dot_product_attention(is_causal=True)`` aligns top-left and
agrees only when ``N_q == N_k``.
"""

from __future__ import annotations

import torch

from flashlab.backward import flash_attention_backward
from flashlab.flash import flash_attention as _numpy_flash_attention


def _numpy(x: torch.Tensor):
    return x.detach().cpu().numpy()


class FlashAttention(torch.autograd.Function):
    """Forward: blocked NumPy FlashAttention (FA2 order). Backward: Algorithm 4 from the saved lse."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_q, block_k):
        ctx.options = {"block_q": block_q, "block_k": block_k, "causal": causal, "scale": scale}
        o, lse = _numpy_flash_attention(_numpy(q), _numpy(k), _numpy(v), return_lse=True, **ctx.options)
        o = torch.from_numpy(o).to(q.device)
        ctx.save_for_backward(q, k, v, o, torch.from_numpy(lse))
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        grads = flash_attention_backward(
            _numpy(q), _numpy(k), _numpy(v), _numpy(o), lse.numpy(), _numpy(do), **ctx.options
        )
        dq, dk, dv = (torch.from_numpy(g).to(x.device) for g, x in zip(grads, (q, k, v), strict=True))
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, causal=False, scale=None, block_q=64, block_k=64):
    """Differentiable attention: ``softmax(scale q k^T) v`` for torch tensors, computed by flashlab.

    Shapes ``q (..., N_q, d)``, ``k (..., N_k, d)``, ``v (..., N_k, d_v)`` (leading dims broadcast);
    float32 or float64 (float16 is computed in float32 and returned as float16). Returns
    ``o (..., N_q, d_v)``; ``o.sum().backward()`` fills ``q.grad``, ``k.grad``, ``v.grad``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(x).__name__}; use torch.as_tensor({name})"
            )
    return FlashAttention.apply(q, k, v, causal, scale, block_q, block_k)
