"""An induction task, made up on the fly, and a seeded training loop for :mod:`flashlab.transformer`.

A sequence is filler, then a segment of ``L`` distinct random tokens, then the same segment again, ``2 half``
tokens in all, with ``L`` drawn per sequence (so no fixed offset gives the answer away). Predicting the next
token inside the repeat needs attention twice: find where the current token appeared before, and copy the
token that followed it there. That is an *induction head* (Olsson et al., 2022). Elsewhere the next token is
a fresh random draw, so loss and accuracy are scored inside the repeat only, where chance is ``1/vocab``.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import torch

from flashlab.attention import naive_attention
from flashlab.flash import TileStep
from flashlab.inputs import causal_mask
from flashlab.tolerance import Bound, attention_bound
from flashlab.transformer import AttentionOnly, sdpa


class Batch(NamedTuple):
    """``inputs, targets`` int64 ``(B, 2 half - 1)`` (targets: inputs shifted by one); ``scored`` bool, the
    positions whose next token the segment determines; ``period`` int64 ``(B,)``, each segment's ``L``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor
    period: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(x.to(device) for x in self))


class Task(NamedTuple):
    """``vocab`` token ids; sequences of ``2 * half`` tokens, segments of ``half // 2 .. half`` tokens."""

    vocab: int = 24
    half: int = 16

    def batch(self, size: int, generator: torch.Generator) -> Batch:
        """``size`` sequences: filler from the tokens not in the segment, the segment, the segment again."""
        if self.vocab <= self.half:
            raise ValueError(f"vocab={self.vocab} must exceed half={self.half} (filler uses other tokens)")
        perm = torch.argsort(torch.rand(size, self.vocab, generator=generator), dim=1)
        period = torch.randint(self.half // 2, self.half + 1, (size,), generator=generator)
        filler = torch.randint(self.half, self.vocab, (size, 2 * self.half), generator=generator)
        pos = torch.arange(2 * self.half)
        start = 2 * self.half - 2 * period[:, None]  # where the first copy begins
        in_segment = (pos >= start) & (pos - start < 2 * period[:, None])
        index = torch.where(in_segment, (pos - start) % period[:, None], filler)
        seq = torch.gather(perm, 1, index)
        scored = pos[:-1] >= start + period[:, None]  # inputs inside the repeat
        return Batch(seq[:, :-1], seq[:, 1:], scored, period)


TASK = Task()


class History(NamedTuple):
    """What :func:`train` returns: the model and, per step, loss and accuracy on that step's batch."""

    model: AttentionOnly
    loss: list[float]
    accuracy: list[float]


def train(
    attention="sdpa", steps=700, *, task=TASK, batch=32, lr=3e-3, seed=0, dtype=torch.float32, device="cpu"
):
    """Train a fresh :class:`AttentionOnly` (2 layers, 4 heads of 16) with Adam on ``task`` for ``steps``.

    The seed fixes the initial weights and every batch, so two runs differ only by what ``attention``
    computes (a name in :data:`flashlab.transformer.ATTENTION` or a function). Loss: cross-entropy of the
    scored positions, in nats; accuracy: the fraction of them whose most likely token is right.
    """
    torch.manual_seed(seed)
    model = AttentionOnly(task.vocab, 2 * task.half).to(device=device, dtype=dtype)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses, accuracies = [], []
    for _ in range(steps):
        b = task.batch(batch, generator).to(device)
        logits, wanted = model(b.inputs, attention)[b.scored], b.targets[b.scored]
        loss = torch.nn.functional.cross_entropy(logits, wanted)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        accuracies.append((logits.argmax(-1) == wanted).float().mean().item())
    return History(model, losses, accuracies)


def loss_gap_bound(model: AttentionOnly, batch: Batch) -> Bound:
    """Bound on ``|loss(attention a) - loss(attention b)|`` when attention is the only float32 step.

    Two attentions that are each within :func:`flashlab.tolerance.attention_bound` ``B_l`` of exact
    attention in layer ``l`` move the loss, to first order, by at most ``sum_l 2 B_l ||dL/do_l||_1``
    (``dL/do_l``: the loss's total derivative in layer ``l``'s attention output ``o_l``, which includes
    every later layer). Computed with the model in float64 and float32 SDPA inside the heads.
    """
    seen = []

    def float32_sdpa(q, k, v):
        o = sdpa(q.float(), k.float(), v.float()).double().requires_grad_()
        seen.append(((q, k, v), o))
        return o

    wide = copy.deepcopy(model).double()
    logits = wide(batch.inputs, float32_sdpa)[batch.scored]
    loss = torch.nn.functional.cross_entropy(logits, batch.targets[batch.scored])
    grads = torch.autograd.grad(loss, [o for _, o in seen])
    terms = [
        2 * attention_bound(*(x.detach().float().numpy() for x in qkv)).atol * float(g.abs().sum())
        for (qkv, _), g in zip(seen, grads, strict=True)
    ]
    return Bound(
        sum(terms), f"first order: sum over {len(terms)} layers of 2 x attention_bound x ||dL/do||_1"
    )


def attention_maps(model: AttentionOnly, inputs) -> list[np.ndarray]:
    """Per layer, every head's attention weights ``P (B, heads, N, N)`` on ``inputs`` (float64, causal)."""
    maps = []
    for q, k, v in model.queries_keys_values(inputs):
        q64, k64 = q.double().numpy(), k.double().numpy()
        _, lse = naive_attention(q64, k64, v.double().numpy(), causal=True, return_lse=True)
        s = q64 @ np.swapaxes(k64, -1, -2) / np.sqrt(q64.shape[-1])
        maps.append(np.where(causal_mask(*s.shape[-2:]), np.exp(s - lse[..., None]), 0.0))
    return maps


def induction_scores(maps: list[np.ndarray], batch: Batch) -> np.ndarray:
    """``(layers, heads)``: the mean weight a scored query ``t`` puts on key ``t - L + 1``, the token that
    followed the current token in the first copy (1 for a perfect induction head)."""
    b, t = np.nonzero(batch.scored.numpy())
    key = t - batch.period.numpy()[b] + 1
    return np.array([p[b, :, t, key].mean(axis=0) for p in maps])


def max_changes(trace: list[TileStep], n_q: int) -> np.ndarray:
    """Per tile ``(i, j)`` of a :func:`flashlab.flash.flash_attention` ``trace`` of one head (``q (N_q, d)``),
    ``(T_r, T_c)`` ints: in how many of the tile's query rows the running max rose, so that the online
    softmax rescaled what those rows had summed so far by ``exp(m_old - m_new) < 1``."""
    counts = np.zeros((max(s.i for s in trace) + 1, max(s.j for s in trace) + 1), dtype=int)
    m = np.full(n_q, -np.inf)
    for step in trace:
        if not step.skipped:
            rows = slice(*step.rows)
            counts[step.i, step.j] = np.sum(np.isfinite(m[rows]) & (step.m > m[rows]))
            m[rows] = step.m
    return counts
