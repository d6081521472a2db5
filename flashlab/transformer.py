"""A small attention-only transformer whose attention is pluggable: torch's SDPA or flashlab's op.

Tokens are embedded (plus a learned position embedding) into a residual stream ``x (B, N, d_model)``;
each layer adds causal multi-head self-attention of ``x`` to it; a linear map reads the logits off the
end. No MLPs and no normalisation: the architecture in which Elhage et al. (2021) found induction heads.
What runs inside the heads is one argument, ``attention``, a function ``(q, k, v) -> o`` on tensors of
shape ``(B, heads, N, d_head)``, causal; :data:`ATTENTION` names the two the course compares.
"""

from __future__ import annotations

import torch
from torch import nn

from flashlab.autograd import flash_attention


def sdpa(q, k, v):
    """torch's ``scaled_dot_product_attention``, causal (N_q = N_k: top-left and bottom-right agree)."""
    return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def flashlab(q, k, v):
    """flashlab's differentiable op: numba kernels on CUDA tensors, NumPy forward and backward on the CPU."""
    return flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)


ATTENTION = {"sdpa": sdpa, "flashlab": flashlab}


class AttentionLayer(nn.Module):
    """``x + W_O attention(W_Q x, W_K x, W_V x)``, the heads side by side in one projection."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, attention):
        b, n, d_model = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d_model // self.heads).permute(2, 0, 3, 1, 4)
        o = attention(q, k, v)  # (B, heads, N, d_head)
        return x + self.out(o.transpose(1, 2).reshape(b, n, d_model))


class AttentionOnly(nn.Module):
    """Attention-only transformer: ``tokens (B, N)`` int64 -> logits ``(B, N, vocab)`` float32.

    ``d_model`` is split into ``heads`` heads of ``d_head = d_model // heads`` (16, 32, 64 or 128 for
    the numba kernels); ``n_ctx`` bounds N (the position embedding's length).
    """

    def __init__(self, vocab: int, n_ctx: int, *, d_model: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must split into heads={heads} equal heads")
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(n_ctx, d_model)
        self.layers = nn.ModuleList(AttentionLayer(d_model, heads) for _ in range(layers))
        self.unembed = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens, attention="sdpa"):
        """``attention``: a name in :data:`ATTENTION` or a function ``(q, k, v) -> o`` (causal)."""
        attend = ATTENTION[attention] if isinstance(attention, str) else attention
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for layer in self.layers:
            x = layer(x, attend)
        return self.unembed(x)

    def queries_keys_values(self, tokens):
        """Per layer, the ``(q, k, v)`` its heads saw (``(B, heads, N, d_head)`` each, detached)."""
        seen = []

        def record(q, k, v):
            seen.append(tuple(t.detach() for t in (q, k, v)))
            return sdpa(q, k, v)

        with torch.no_grad():
            self(tokens, record)
        return seen
