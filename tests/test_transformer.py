"""The capstone model: it learns the induction task, and SDPA or flashlab inside it give the same losses."""

import copy

import numpy as np
import pytest
import torch

import flashlab  # noqa: F401  (before numba)
from flashlab.flash import flash_attention
from flashlab.induction import Task, attention_maps, induction_scores, loss_gap_bound, max_changes, train
from flashlab.transformer import ATTENTION, AttentionOnly

TINY = Task(vocab=32, half=24)


def test_the_task_repeats_distinct_tokens():
    inputs, targets = TINY.batch(5, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (5, 47)
    seq = torch.cat([inputs, targets[:, -1:]], dim=1)
    assert torch.equal(seq[:, :24], seq[:, 24:])
    assert all(len(set(row[:24].tolist())) == 24 for row in seq)
    s = TINY.scored()  # the next token of each scored position appeared after that token in the first half
    assert torch.equal(targets[:, s], inputs[:, s.start - 23 : s.stop - 23])


def test_the_model_learns_far_above_chance():
    """Through flashlab's NumPy forward and backward. Chance is 1/32 on the scored positions; 120 steps
    take the last batches' accuracy above 0.9 (SDPA's run tracks this one, see below)."""
    history = train("flashlab", 120, task=TINY)
    assert history.loss[-1] < history.loss[0] / 4
    assert sum(history.accuracy[-10:]) / 10 > 0.9 > 1 / TINY.vocab


def test_sdpa_and_flashlab_give_losses_within_the_derived_bound():
    """Model in float64, only the heads in float32: along five Adam steps, the two attentions' losses at
    the same weights differ by at most loss_gap_bound (first order in attention's float32 error)."""
    torch.manual_seed(0)
    model = AttentionOnly(TINY.vocab, 2 * TINY.half).double()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        inputs, targets = TINY.batch(8, gen)
        losses = {}
        for name, attend in ATTENTION.items():
            logits = model(inputs, lambda q, k, v, f=attend: f(q.float(), k.float(), v.float()).double())
            s = TINY.scored()
            losses[name] = torch.nn.functional.cross_entropy(
                logits[:, s].reshape(-1, TINY.vocab), targets[:, s].reshape(-1)
            )
        bound = loss_gap_bound(model, inputs, targets, TINY)
        gap = abs(losses["sdpa"].item() - losses["flashlab"].item())
        assert gap <= bound.atol, f"loss gap {gap:.2e} exceeds {bound}"
        optimiser.zero_grad()
        losses["sdpa"].backward()
        optimiser.step()


def test_training_is_deterministic_and_float32_runs_track_each_other():
    a, b = train("sdpa", 5, task=TINY), train("sdpa", 5, task=TINY)
    assert a.loss == b.loss and a.accuracy == b.accuracy
    assert torch.equal(a.model.unembed.weight, b.model.unembed.weight)


def test_queries_keys_values_are_what_the_heads_see():
    model = copy.deepcopy(train("sdpa", 1, task=TINY).model)
    inputs, _ = TINY.batch(2, torch.Generator().manual_seed(1))
    seen = model.queries_keys_values(inputs)
    assert len(seen) == 2 and all(t.shape == (2, 4, 47, 16) for qkv in seen for t in qkv)


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="heads=3"):
        AttentionOnly(8, 8, d_model=64, heads=3)


def test_a_trained_model_has_an_induction_head():
    """After the learning run, some head of the last layer puts most of its weight on the induction target."""
    model = train("sdpa", 120, task=TINY).model
    maps = attention_maps(model, TINY.batch(4, torch.Generator().manual_seed(9))[0])
    assert all(np.allclose(p.sum(-1), 1.0, rtol=0, atol=1e-12) for p in maps)  # float64 softmax rows
    scores = induction_scores(maps, TINY)
    assert scores.shape == (2, 4) and scores[1].max() > 0.5 > 1 / TINY.half


@pytest.mark.parametrize("n, block", [(13, 4), (20, 7), (9, 9)])
def test_max_changes_counts_rises_of_the_running_max(n, block):
    """Keys in increasing order of logit: every tile after a row's first (column 0) raises its max, the
    diagonal tile too (each row sees its own, largest, key there)."""
    q = np.ones((n, 1))
    k = np.arange(n, dtype=float)[:, None]  # the score of key j is j / 1: increasing along the keys
    trace = []
    flash_attention(q, k, k, block_q=block, block_k=block, causal=True, trace=trace)
    counts = max_changes(trace, n)
    rows = np.diff([min(r * block, n) for r in range(counts.shape[0] + 1)])
    expected = np.tril(np.ones_like(counts)) * rows[:, None]
    expected[:, 0] = 0
    np.testing.assert_array_equal(counts, expected)
    k_down = -k  # decreasing: the first tile holds every row's max
    trace = []
    flash_attention(q, k_down, k_down, block_q=block, block_k=block, causal=True, trace=trace)
    assert max_changes(trace, n).sum() == 0
